"""Benchmarks that print figures and ratios: `python -m bench.perf NAME` (one module each)."""
