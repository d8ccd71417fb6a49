"""The decision log (audit log) and the idempotency index built on it.

`format` (frames, segment files, the request digest), `segments` (the writer: append, rotate,
seal, recover a torn tail), `reader` (read and verify a log directory; no writer needed),
`index` (request id -> stored decision, in SQLite, shared by the processes of one host) and
`log` (the writer thread that makes a batch's records durable before its responses go out).
The record format is proto/uwrt/v1/records.proto (README "Decision records").

Sits below the server and above the bundle: imports only uwrt.runtime.{config, errors, pb}
and the bundle layer; the server and the CLI import it.
"""
