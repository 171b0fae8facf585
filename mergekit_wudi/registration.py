"""Registering our methods in mergekit's registry, and atomic output for ``run_merge``."""

from __future__ import annotations

import functools


def method_names() -> tuple[str, ...]:
    from mergekit_wudi.methods import METHODS

    return tuple(m.spec.name for m in METHODS)


def register_methods() -> None:
    """Register every method of :mod:`mergekit_wudi.methods` that is not registered yet."""
    import sys

    partial = sys.modules.get("mergekit_wudi.methods")
    if partial is not None and not hasattr(partial, "METHODS"):
        return  # methods.py is still being imported; it calls us again when it is done
    from mergekit import merge_methods

    from mergekit_wudi.methods import METHODS

    present = {m.spec.name for m in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in present:
            merge_methods.register(method)


def patch_run_merge() -> None:
    """Make ``mergekit.merge.run_merge`` atomic for merges that use our methods.

    The merge is written into a temporary folder beside ``out_path`` and moved into place only when
    complete, so a failed merge (bad tensor, interrupted run) leaves no half-written model.
    Merges with other methods run exactly as mergekit does them.
    """
    import sys

    module = sys.modules["mergekit.merge"]
    original = module.run_merge
    if getattr(original, "_mergekit_wudi_atomic", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method not in method_names():
            return original(merge_config, out_path, options, config_source=config_source)
        from mergekit_wudi.io import atomic_directory

        with atomic_directory(out_path) as tmp_out:
            return original(merge_config, tmp_out, options, config_source=config_source)

    run_merge._mergekit_wudi_atomic = True
    module.run_merge = run_merge
