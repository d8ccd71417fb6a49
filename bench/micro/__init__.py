"""pytest-benchmark microbenchmarks (see conftest.py for how to run them)."""
