"""Framework-free merging math: plain functions, tensors in, tensor out (no mergekit, no Lightning).

- :mod:`.wudi`: WUDI-Merging solvers (arXiv 2503.08099); the problem they solve is in
  :mod:`.interference`, its three solvers and their defaults in :mod:`.interference_solvers`, the
  spectral solver's matrix functions in :mod:`.matrix_functions`, OptMerge's low-rank problem in
  :mod:`.optmerge`, the rank-``k`` fast path in :mod:`.wudi_lowrank`.
- :mod:`.task_vectors`: task vectors, their pre-processing (LwPTV then AWD) and the non-linear rule.
- :mod:`.numerics`: the compute dtype and the finite check every solver uses.
- :mod:`.awd`: AWD task-vector disentanglement (arXiv 2411.18729), ``disentangle(task_vectors)``.
- :mod:`.lwptv`: LwPTV layer-wise task-vector pruning (arXiv 2506.09093), ``saliency``,
  ``layer_mask``, ``apply_mask``, ``layer_masks``.
- :mod:`.subspace_merging`: the methods WUDI is compared with, merging in singular subspaces:
  TSV-M (arXiv 2412.00081) and Iso-C / Iso-CTS (arXiv 2502.04959), ``tsv_merge``, ``iso_c``, ``iso_cts``.
"""
