"""Benchmarks: the `uwrt bench` load generator (uwrt.bench.loadgen: Python and native engines,
traffic, accounting, reports) and its histogram (uwrt.bench.hist), the comparison servers (the
naive server, the Ray Serve peer, the no-model echo server for the transport floor) and how they
are started (uwrt.bench.servers), bench/compare, the component benchmarks and the pytest-benchmark
microbenchmarks (bench/micro). The native engine's C source is bench/native/."""
