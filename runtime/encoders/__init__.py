"""Stage 2: the sequence encoder, packed event histories -> embeddings.

`base` is the interface (`EncoderBackend`), `build` the factory the pipeline calls; one module
per implementation: `torch_encoder` (the reference model and eager backend), `torchscript_encoder`,
`onnx_encoder` (the CPU default), `triton_encoder` (the GPU path over uwrt.kernels) and
`fallback` (GPU -> CPU on failure). May import uwrt.kernels, uwrt.runtime.featurize (the packed
format), bundle and config; never the pipeline, serving or CLI.
"""
