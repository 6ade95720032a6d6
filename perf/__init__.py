"""Trident benchmarks: perf_analyzer suite, inputs, baselines, report (`python -m perf --help`)."""
