# Files here are helpers for running mergekit 0.1.5's own test suite (see run.sh);
# common.py is copied into the extracted sdist as tests/common.py. Nothing here is a test of
# ours, so our own pytest run must not collect (or import) anything from this folder.
collect_ignore_glob = ["*"]
