"""The gRPC decision server: `server` (grpc.aio service, health, reflection, shutdown), `batcher`
(async driver) around `batching` (the pure, clock-free batching policy), and `warmup` (every
batch shape before SERVING). May import the pipeline and everything below it; never the CLI,
uwrt.demo or uwrt.bench.
"""
