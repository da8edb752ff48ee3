"""Benchmarks: one module per op, run as `python -m bench.<op>`; shared helpers in common."""
