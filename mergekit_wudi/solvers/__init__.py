"""Framework-free merging math: plain functions, tensors in, tensor out (no mergekit, no Lightning).

- :mod:`.wudi`: WUDI-Merging solvers (arXiv 2503.08099).
- :mod:`.awd`: AWD task-vector disentanglement (arXiv 2411.18729), ``disentangle(task_vectors)``.
- :mod:`.lwptv`: LwPTV layer-wise task-vector pruning (arXiv 2506.09093), ``saliency``,
  ``layer_mask``, ``apply_mask``, ``layer_masks``.
"""
