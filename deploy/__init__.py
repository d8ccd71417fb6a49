"""Running uwrt beyond one process: the HAProxy configuration and a local multi-replica topology
(`python deploy/cluster.py up`), the client-side gRPC service config (round_robin + health
checking + the retry policy), and Kubernetes manifests (`deploy/k8s/`). README: "Scaling out".

Tooling used from a checkout (the Makefile, the tests, `bench/replicas.py`); it is not part of
the installed `uwrt` package and nothing on the serving path imports it.
"""
