"""Framework-free merging math: plain functions, tensors in, tensor out (no mergekit, no Lightning)."""
