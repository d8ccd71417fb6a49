"""The `uwrt` command line (`main`), one module per command group: `decide` (a client of a
running server), `bundle` (`uwrt bundle create|inspect`). The top of the dependency graph: it
may import anything, including uwrt.demo and uwrt.bench, which the rest of the runtime never does.
"""
from uwrt.runtime.cli.main import main

__all__ = ["main"]
