"""The speed / scale benchmark (``python benchmarks/speed.py``), split by concern."""
