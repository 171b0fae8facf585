"""Start-up hook that lets a plain ``mergekit-yaml`` see this plugin's merge methods.

mergekit 0.1.5 has no plugin discovery, so ``mergekit_wudi_startup.pth`` (installed into
site-packages) imports this module at every interpreter start. It imports nothing heavy: it only
puts a finder on ``sys.meta_path`` that waits for mergekit to be imported, then

- registers our methods once ``mergekit.merge_methods`` has finished loading, and
- makes ``mergekit.merge.run_merge`` write merges that use our methods atomically.
"""

from __future__ import annotations

import sys

_TARGETS = ("mergekit.merge_methods", "mergekit.merge")


def _after_import(name: str) -> None:
    # Called right after the module's code ran; its parent package may not have the attribute yet.
    if name == "mergekit.merge_methods":
        from mergekit_wudi import registration

        registration.register_methods()
    elif name == "mergekit.merge":
        from mergekit_wudi import registration

        registration.patch_run_merge()


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
                    _exec(module)
                    _after_import(_name)

                spec.loader.exec_module = exec_then_hook
                return spec
        return None


def install() -> None:
    """Idempotent: hook future imports, and act now on targets that are already imported."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name in _TARGETS:
        if name in sys.modules:
            _after_import(name)


install()
