"""A real Prometheus server scraping `uwrt serve` with deploy/prometheus/prometheus.yml (its own
ports, a 1 s interval), read back through its HTTP API: the p99 of Decide computed by Prometheus's
histogram_quantile equals the same interpolation over a direct scrape, and the README's
rate-based p99 query answers. Skipped, naming the package, where the prometheus binary is absent
(`make ops-prometheus` installs Debian's prometheus; `make test` does not)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from tests.factories import ROOT, relabelled
from tests.runtime.serving.test_metrics import Live, scrape, value
from uwrt.runtime.pb import pb_grpc
from uwrt.runtime.serving.ports import check_free

CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def find_prometheus() -> str:
    exe = shutil.which("prometheus") or (shutil.which("prometheus", path="/usr/bin:/usr/sbin") or "")
    if not exe:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus: `make ops-prometheus` "
                    "as root, or apt-get install -y prometheus)")
    return exe


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    doc = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def scalar(port: int, expr: str) -> float:
    r = query(port, expr)
    return float(r[0]["value"][1]) if r else math.nan


def wait_for(fn, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def quantile_reference(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus's histogram_quantile on cumulative (le, count) pairs, written out: linear
    interpolation inside the bucket holding rank q * total, from 0 for the first bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return math.nan


def test_prometheus_scrapes_and_answers_p99(small_bundle, traffic, tmp_path):
    exe = find_prometheus()
    live = Live(small_bundle, tmp_path, "--workers", "1")
    prom = None
    try:
        web = check_free("127.0.0.1", 0)
        cfg = CONFIG.read_text().replace("127.0.0.1:9464", f"127.0.0.1:{live.mport}")
        cfg = cfg.replace("scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s",
                                                                                  "evaluation_interval: 1s")
        assert f"127.0.0.1:{live.mport}" in cfg and "scrape_interval: 1s" in cfg
        (tmp_path / "prometheus.yml").write_text(cfg)
        prom = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        wait_for(lambda: _ready(web), 120, "prometheus to be ready")
        wait_for(lambda: query(web, 'up{job="uwrt"} == 1'), 90, "prometheus to scrape uwrt")
        sel = 'uwrt_request_duration_seconds_count{method="Decide",code="OK"}'
        with grpc.insecure_channel(f"127.0.0.1:{live.port}") as ch:
            stub = pb_grpc.UnderwritingStub(ch)
            for phase, n in (("a", 30), ("b", 60)):            # two phases: rate() sees the counts grow
                for f in [stub.Decide.future(r, timeout=30) for r in relabelled(traffic, f"p{phase}", n)]:
                    f.result()
                sent = 30 if phase == "a" else 90
                wait_for(lambda sent=sent: scalar(web, f"sum({sel})") == sent, 90,
                         f"{sent} Decides in prometheus")
        # every request counted, and the same histogram as a direct scrape
        direct = scrape(live.mport)
        buckets = [(float(lab["le"]), v) for lab, v in direct["uwrt_request_duration_seconds_bucket"]
                   if lab.get("method") == "Decide" and lab.get("code") == "OK"]
        assert value(direct, "uwrt_request_duration_seconds_count", method="Decide", code="OK") == 90
        p99 = scalar(web, 'histogram_quantile(0.99, sum by (le) '
                          '(uwrt_request_duration_seconds_bucket{method="Decide",code="OK"}))')
        assert p99 == pytest.approx(quantile_reference(buckets, 0.99), rel=1e-9)
        assert 0 < p99 <= 1.0
        # the README's form: over a rate window
        p99_rate = scalar(web, 'histogram_quantile(0.99, sum by (le) '
                               '(rate(uwrt_request_duration_seconds_bucket{method="Decide",code="OK"}[1m])))')
        assert math.isfinite(p99_rate) and p99_rate > 0
        stages = query(web, "histogram_quantile(0.99, sum by (stage, le) "
                            "(rate(uwrt_stage_duration_seconds_bucket[1m])))")
        assert {"featurize", "encode", "trees", "policy", "batch"} <= {r["metric"]["stage"] for r in stages}
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(30)
            except subprocess.TimeoutExpired:
                prom.kill()
        assert live.stop() == 0


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200
    except OSError:
        return False
