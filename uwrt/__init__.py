"""uwrt: a low-latency inference runtime for credit-underwriting decisions.

The installed package is one namespace over the repository's top-level folders:

    uwrt.runtime   runtime/   serving, pipeline, stages, bundle loading, CLI
    uwrt.kernels   kernels/   Triton kernels with their torch references
    uwrt.bench     bench/     load generator, comparison servers, benchmarks
    uwrt.demo      demo/      synthetic applicants and the demo trainer (not on the serving path)

In a source checkout this folder holds symlinks to those folders, so the same import names
work from a clone without installing; `setup.py` maps them with `package_dir` for a wheel.
"""
from uwrt.runtime import __version__

__all__ = ["__version__"]
