"""The quality benchmark (``python benchmarks/quality.py``), split by concern: tasks, model, experts,
evaluation, method table, report, command line."""
