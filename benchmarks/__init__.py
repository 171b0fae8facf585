"""Benchmarks of mergekit-wudi (not a unit test suite): speed, quality, MuDSC."""
