"""Our methods in mergekit's registry. One way: this module imports :mod:`mergekit_wudi.methods`;
nothing imports this module but the start-up hook (:mod:`mergekit_wudi._startup`) and
:func:`mergekit_wudi.register_methods`."""

from __future__ import annotations


def method_names() -> tuple[str, ...]:
    """Names of the merge methods this package registers."""
    from mergekit_wudi.methods import METHODS

    return tuple(method.spec.name for method in METHODS)


def register_methods() -> None:
    """Register every method of :data:`mergekit_wudi.methods.METHODS` not registered yet (idempotent)."""
    from mergekit import merge_methods

    from mergekit_wudi.methods import METHODS

    present = {method.spec.name for method in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in present:
            merge_methods.register(method)
