"""uwrt.runtime: everything on the serving path, one subpackage per stage.

Dependencies point one way (tests/test_layout.py enforces it):

    cli -> serving -> pipeline -> stages (featurize, encoders, trees, policy) -> bundle -> config, errors, pb

* `config`, `profiles`, `errors`, `jsonl`, `pb/`: configuration, error codes, the request file
  format and the generated gRPC stubs; they import nothing else from uwrt.
* `bundle/`: the model bundle (format, verification, schema).
* `featurize`, `encoders/`, `trees/`, `policy`: the four stages.
* `pipeline`: featurize -> encoder -> trees -> policy, transport-free.
* `serving/`: the gRPC server, the batcher and its pure policy, warm-up.
* `cli/`: the `uwrt` command. Only the CLI may import `uwrt.demo` (the demo trainer) and
  `uwrt.bench` (the load generator).
"""
__version__ = "0.1.0"
