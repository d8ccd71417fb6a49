"""`python -m uwrt.runtime.cli ...` is `uwrt ...`."""
import sys

from uwrt.runtime.cli.main import main

sys.exit(main())
