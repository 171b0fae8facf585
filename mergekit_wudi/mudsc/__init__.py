"""MuDSC: merging models that share no base, by dual-space unit matching.

Xu et al., "Training-Free Pretrained Model Merging" (CVPR 2024, arXiv 2403.01753): units of models
with the same architecture but different initialisations are matched before averaging, with the
similarity ``S = a * S_w + (1 - a) * S_act`` (weight-space and activation-space Pearson correlation),
alternating over layers; attention heads and GroupNorm groups move as blocks; BatchNorm statistics
are reset afterwards. It needs a few batches of unlabeled inputs, so it lives here (Python API) and in
the Lightning callback, not in per-tensor mergekit.

Public entry point: :func:`mudsc_merge` (``alpha`` is the paper's ``a``; ``a=`` is accepted too);
:func:`check_parameters` checks its keyword parameters before any model or data exists.

- :mod:`.similarity`: streamed Pearson correlation, weight-slice correlation, ``S`` (framework-free)
- :mod:`.matching`: Hungarian / ZipIt greedy, unit- and block-wise (framework-free)
- :mod:`.graph`: ``torch.fx`` discovery of which tensors permute together (:mod:`.spec`: its result;
  :mod:`.ops`: what each supported module / function does, as tables; :mod:`.transformer`: encoder
  layers; :mod:`.features`: the activations recorded for ``S_act``)
- :mod:`.states`: state-dict math (weight features, permuting and averaging units)
- :mod:`.data`: inputs of a batch, BatchNorm reset (``torch.optim.swa_utils.update_bn``)
- :mod:`.checks`: early checks of arguments and models, finite checks of activations and results
- :mod:`.merge`: the driver (feature collection, sweeps, merge)
"""

from .graph import SUPPORTED_MODULES, UnsupportedModuleError, build_spec
from .checks import MODES
from .data import default_input_fn, reset_batchnorm
from .merge import check_parameters, mudsc_merge

__all__ = ["mudsc_merge", "check_parameters", "reset_batchnorm", "build_spec", "default_input_fn",
           "UnsupportedModuleError", "SUPPORTED_MODULES", "MODES"]
