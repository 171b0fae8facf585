"""Start-up hook that lets a plain ``mergekit-yaml`` see this plugin's merge methods.

mergekit 0.1.5 has no plugin discovery, so ``mergekit_wudi.pth`` (installed into site-packages)
imports this module at every interpreter start. It imports nothing heavy: it only puts a finder on
``sys.meta_path`` that runs code right after three modules finish loading:

- ``mergekit.merge_methods`` and ``mergekit_wudi.methods``: once both are loaded, our methods are
  registered (:func:`mergekit_wudi.registration.register_methods`). If mergekit is imported first,
  this imports ``mergekit_wudi.methods`` at that moment; if our kernels are imported first (they
  import mergekit), registration waits until they have finished loading. No import cycle.
- ``mergekit.merge``: its ``run_merge`` gets the safe-output wrapper
  (:func:`mergekit_wudi.output.install`), before ``mergekit-yaml`` imports the name.
- ``mergekit.io.tasks``: its writer tasks check our methods' results after the ``out_dtype`` cast
  (:func:`mergekit_wudi.final_cast.install`).
- ``mergekit.config``: ``MergeConfiguration.model_validate`` checks a config for our methods before
  pydantic parses it (:func:`mergekit_wudi.validation.install`): unknown keys, null values and bad
  ``{filter, value}`` entries are one named error, not pages of pydantic output or a silent drop.
"""

from __future__ import annotations

import sys

_REGISTRY, _KERNELS, _MERGE = "mergekit.merge_methods", "mergekit_wudi.methods", "mergekit.merge"
_TASKS, _CONFIG = "mergekit.io.tasks", "mergekit.config"
_TARGETS = (_REGISTRY, _KERNELS, _MERGE, _TASKS, _CONFIG)
_loading: set = set()


def _loaded(name: str) -> bool:
    return name in sys.modules and name not in _loading


def _after_import(name: str) -> None:
    """Run once ``name`` (one of :data:`_TARGETS`) has finished loading."""
    if name in (_REGISTRY, _KERNELS) and _loaded(_REGISTRY) and _KERNELS not in _loading:
        from mergekit_wudi import registration

        registration.register_methods()
    elif name == _MERGE:
        from mergekit_wudi import output

        output.install(sys.modules[_MERGE])
    elif name == _TASKS:
        from mergekit_wudi import final_cast, registration

        final_cast.install(sys.modules[_TASKS], registration.method_names)
    elif name == _CONFIG:
        from mergekit_wudi import validation

        validation.install(sys.modules[_CONFIG])


class _PostImportFinder:
    """Finds nothing itself; wraps the real loader of a target module to run code after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_then_hook(module, _exec=exec_module, _name=fullname):
                    _loading.add(_name)
                    try:
                        _exec(module)
                    finally:
                        _loading.discard(_name)
                    _after_import(_name)

                spec.loader.exec_module = exec_then_hook
                return spec
        return None


def install() -> None:
    """Idempotent: hook future imports, and act now on targets that are already imported."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name in _TARGETS:
        if _loaded(name):
            _after_import(name)


install()
