"""Compute kernels for the packed (ragged, unpadded) sequence encoder.

One op per module, each with its Triton kernel, host launcher and pure-torch reference:
`prologue` (embedding gathers + input projection), `ln_qkv` (LayerNorm + linear), `attention`
(variable-length attention), `attn_block` (attention + output projection + residual +
LayerNorm), `mlp` (fused GELU MLP + residual), `epilogue` (final LayerNorm + pooling).
`reference` holds the CPU path's packed-layout ops (bucketed attention, segment mean);
`dispatch` chooses Triton or the reference per op; `compile_check` compiles every kernel
variant for sm_80 / sm_90 without a GPU.
"""
