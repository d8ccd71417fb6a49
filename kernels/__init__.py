"""Compute kernels for the packed sequence encoder.

Each op has a pure-torch reference (also the CPU serving path) in `kernels.reference`; the fused
Triton implementations and the dispatch module build on these (see the kernels issue).
"""
