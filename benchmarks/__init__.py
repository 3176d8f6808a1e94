"""Runnable speed comparisons; see benchmarks/RESULTS.md for the figures measured and the machine."""
