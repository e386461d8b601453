"""Benchmarks: commands that measure and write their figures to files (not timed tests)."""
