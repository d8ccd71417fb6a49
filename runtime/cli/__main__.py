"""`python -m uwrt.runtime.cli ...` is `uwrt ...`."""
from uwrt.runtime.cli.main import entry

entry()
