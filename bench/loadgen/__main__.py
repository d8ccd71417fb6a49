"""`python -m uwrt.bench.loadgen ...`: the same as `uwrt bench ...`, without the uwrt CLI."""
import sys

from uwrt.bench.loadgen.cli import main

sys.exit(main())
