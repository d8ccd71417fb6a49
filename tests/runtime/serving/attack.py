"""The server the attack corpus and the fuzz test hit: `uwrt serve` in its own process (so its
memory, log and survival can be observed from /proc and its stderr), one for the session, and
the three checks every attack ends with: the status code, the server still up (process alive,
health SERVING), and a valid neighbour request answered exactly as `Pipeline.decide` answers it
offline on the same bundle (bit for bit: probability, score, reasons)."""
from __future__ import annotations

import itertools
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from uwrt.runtime.pb import pb, pb_grpc

DECIDE = "/uwrt.v1.Underwriting/Decide"
DECIDE_STREAM = "/uwrt.v1.Underwriting/DecideStream"
#: a connection of its own per channel
FRESH = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]


def _identity(b: bytes) -> bytes:
    return b


class AttackServer:
    """`uwrt serve --workers 1` on port 0 with its stderr in a file."""

    def __init__(self, bundle, log_path, extra: Sequence[str] = ()) -> None:
        self.log_path = log_path
        cmd = [sys.executable, "-m", "uwrt.runtime.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--workers", "1", "--profile", "cpu", "--model-info-exposure", "full", *extra]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = self._wait_port(300)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target, options=FRESH)
        self.stub = pb_grpc.UnderwritingStub(self.channel)
        self.raw_decide = self.channel.unary_unary(DECIDE, request_serializer=_identity,
                                                   response_deserializer=pb.DecisionResponse.FromString)
        self.raw_stream = self.channel.stream_stream(DECIDE_STREAM, request_serializer=_identity,
                                                     response_deserializer=pb.DecisionResponse.FromString)

    def _wait_port(self, timeout_s: float) -> int:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if sel.select(max(0.0, end - time.monotonic())):
                line = self.proc.stdout.readline()
                if not line:
                    break
                m = re.search(r"uwrt serving on [\d.]+:(\d+)", line)
                if m:
                    return int(m.group(1))
        raise AssertionError(f"uwrt serve did not start (exit {self.proc.poll()}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def proc_status(self) -> dict[str, int]:
        """VmRSS / VmHWM of the server process, in KiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
        return out

    def settings(self) -> dict[str, str]:
        return dict(self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).settings)

    def assert_up(self) -> None:
        assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log()[-4000:]}"
        with grpc.insecure_channel(self.target, options=FRESH) as ch:     # a new connection
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert st.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> int:
        self.channel.close()
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


class Neighbours:
    """Valid requests with their offline answers; `check(response)` compares bit for bit."""

    def __init__(self, pipe, requests) -> None:
        self.reqs = list(requests)
        self.want = {r.request_id: o for r, o in zip(self.reqs, pipe.decide(self.reqs), strict=True)}
        self._it = itertools.cycle(self.reqs)

    def next(self) -> pb.DecisionRequest:
        return next(self._it)

    def check(self, got: pb.DecisionResponse) -> None:
        want = self.want[got.request_id]
        assert not got.HasField("error"), got.error
        assert got.outcome == want.outcome, got.request_id
        assert got.probability_of_default == want.probability_of_default, got.request_id     # bit for bit
        assert got.score == want.score, got.request_id
        assert ([(r.code, r.contribution) for r in got.reasons]
                == [(r.code, r.contribution) for r in want.reasons]), got.request_id
        assert got.model.bundle_digest == want.model.bundle_digest

    def decide(self, stub, timeout: float = 30.0) -> None:
        """Send one neighbour now and check its answer."""
        self.check(stub.Decide(self.next(), timeout=timeout))
