"""Pipeline.decide thread CPU per request at fixed batch sizes, for the checkout on PYTHONPATH.

    PYTHONPATH=/tmp/uwrt-base python bench/pipeline_cpu.py bundles/small     # an older commit
    PYTHONPATH=$PWD          python bench/pipeline_cpu.py bundles/small     # this one

Prints one JSON line {batch size: median microseconds of thread CPU per request} over 200
batches of generator requests (seed 5) per size, after 20 warm-up batches. Thread CPU
(CLOCK_THREAD_CPUTIME_ID) rather than wall time, so that other processes on a shared machine
inflate it less; run checkouts alternately and compare within one run. Uses only Pipeline,
featurize's callers and the demo generator, so it runs against older commits too.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    from uwrt.demo.synth import generate
    from uwrt.runtime.pipeline import Pipeline
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    p = Pipeline.from_dir(argv[0])
    reqs = generate(1024, 5).requests
    out = {}
    for size in (1, 4, 16):
        batches = [reqs[i:i + size] for i in range(0, 1024 - size, size)][:200]
        for b in batches[:20]:
            p.decide(b)
        ts = []
        for b in batches:
            t0 = time.thread_time_ns()
            p.decide(b)
            ts.append((time.thread_time_ns() - t0) / 1000 / size)
        out[size] = round(float(np.median(ts)), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
