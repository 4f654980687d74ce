"""Triton kernels, installed as `internvl_engine.kernels`; each kernel file sits beside its PyTorch `*_ref`.

The kernels arrive with the Triton issue; the PyTorch path in `internvl_engine.models` is the reference.
"""
