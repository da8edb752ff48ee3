"""Triton kernels, one module per op, installed as condense_engine.kernels.

Nothing here is imported at package import: triton stays optional and is loaded only when an op
actually dispatches to its Triton backend.
"""
