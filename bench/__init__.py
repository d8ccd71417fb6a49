"""Benchmarks and the `uwrt bench` load generator (bench.loadgen), its histogram (bench.hist),
traffic sources (bench.traffic), the naive and Ray Serve comparison servers, bench/compare and
the pytest-benchmark microbenchmarks (bench/micro)."""
