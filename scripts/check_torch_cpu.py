#!/usr/bin/env python3
"""Fail if the installed torch is a CUDA build in the CPU profile (a loose pin pulls a multi-GB
CUDA wheel; requirements/cpu.txt pins the CPU build exactly). Run by `make install` and CI."""
import sys

import torch

if torch.version.cuda is not None or "+cpu" not in torch.__version__:
    print(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) is not the CPU build; "
          "install requirements/cpu.txt into a fresh environment", file=sys.stderr)
    sys.exit(1)
print(f"torch {torch.__version__}: CPU build, ok")
