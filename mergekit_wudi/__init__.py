"""mergekit-wudi: WUDI-Merging and its sibling methods for mergekit 0.1.5 and PyTorch Lightning.

Importing this package is cheap and makes our merge methods (``wudi``, ...) available in mergekit's
registry: at once if mergekit is already imported, else as soon as it is. The ``.pth`` hook this
package installs does the same at interpreter start, so plain ``mergekit-yaml`` sees them too.

- the math: :mod:`mergekit_wudi.solvers` (framework-free functions)
- the mergekit adapter: :mod:`mergekit_wudi.methods` (kernels), :mod:`mergekit_wudi.registration`
  (the registry), :mod:`mergekit_wudi._startup` (the start-up hook), :mod:`mergekit_wudi.output`
  (what a merge does to its output folder), :mod:`mergekit_wudi.validation` and
  :mod:`mergekit_wudi.inputs` (checks before any tensor is read)
- the Lightning callback: :mod:`mergekit_wudi.lightning`
- merging with input Grams from Python: :func:`merge_with_input_grams` (:mod:`mergekit_wudi.input_grams`)
"""

from mergekit_wudi import _startup  # noqa: F401  (installs the registration hook)

__version__ = "0.1.0"


def merge_with_input_grams(base, experts, grams, **options):
    """Merge state dicts with each expert's input Grams where they exist (RegMean's objective on task
    vectors), mergekit's ``method`` elsewhere: :func:`mergekit_wudi.input_grams.merge_with_input_grams`."""
    from mergekit_wudi.input_grams import merge_with_input_grams as _merge

    return _merge(base, experts, grams, **options)


def register_methods() -> None:
    """Register this package's mergekit methods now (idempotent)."""
    from mergekit_wudi.registration import register_methods as _register

    _register()
