"""Benchmarks and the `uwrt bench` load generator (uwrt.bench.loadgen), its histogram (uwrt.bench.hist),
traffic sources (uwrt.bench.loadgen.traffic), the naive and Ray Serve comparison servers, bench/compare and
the pytest-benchmark microbenchmarks (bench/micro)."""
