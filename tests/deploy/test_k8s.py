"""deploy/k8s/: the manifests validate offline against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail), and everything they say about uwrt is true of `uwrt serve`: every flag
exists and parses, the port, the probes' gRPC port and health services, the drain timing, the
read-only bundle and the writable caches. They cannot run on this machine (no cluster)."""
from __future__ import annotations

import copy
import pathlib

import pytest

from deploy.cluster import serve_flags
from tests.factories import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML (requirements/test.txt, with kubernetes-validate)")

K8S = ROOT / "deploy" / "k8s"
VERSIONS = ("1.30.0", "1.37.0")          # oldest supported (preStop sleep on by default), newest bundled
SERVICE = "uwrt.v1.Underwriting"
WARMUP_BUDGET_S = {"cpu": 300, "gpu": 600}   # startup probe: at least this long for load + warm-up
EXIT_S = 8                               # process exit after a clean drain (teardown), with margin
DEPLOYMENTS = {"cpu": K8S / "deployment.yaml", "gpu": K8S / "gpu" / "deployment.yaml"}


def _docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[str, list[dict]]:
    return {str(p.relative_to(ROOT)): _docs(p) for p in sorted(K8S.rglob("*.yaml"))}


def _one(path: pathlib.Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _container(profile: str) -> tuple[dict, dict]:
    dep = _one(DEPLOYMENTS[profile], "Deployment")
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "uwrt"]
    return dep, c


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_manifest_is_a_known_kind():
    kinds = sorted(d["kind"] for docs in _all().values() for d in docs)
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (requirements/test.txt)")
    for path, docs in _all().items():
        for d in docs:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path}: {d['kind']} does not validate against {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


def test_the_validator_rejects_broken_manifests():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (requirements/test.txt)")
    dep = _one(DEPLOYMENTS["cpu"], "Deployment")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    for bad in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_container_runs_uwrt_serve_with_flags_that_exist(profile):
    from uwrt.runtime.cli.main import build_parser
    _, c = _container(profile)
    assert c["command"] == ["uwrt"] and c["args"][0] == "serve"
    args = [str(a) for a in c["args"]]
    flags = [a for a in args if a.startswith("--")]
    assert set(flags) <= serve_flags(), set(flags) - serve_flags()
    parsed = build_parser().parse_args(args)               # every value has the right type
    assert parsed.knob_profile == profile
    assert parsed.knob_host == "0.0.0.0"                   # reachable from other pods, not loopback only
    from uwrt.runtime.config import knobs
    env_names = {f"UWRT_{dotted.replace('.', '_').upper()}" for dotted, *_ in knobs()}
    env_names |= {"UWRT_CACHE_DIR", "UWRT_STATE_DIR"}
    for e in c.get("env", []):
        if e["name"].startswith("UWRT_"):
            assert e["name"] in env_names, e["name"]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_ports_and_probes_match_the_server(profile):
    from uwrt.runtime.serving.server import SERVICE_NAME
    assert SERVICE_NAME == SERVICE
    _, c = _container(profile)
    port = int(_flag(c["args"], "--port"))
    (grpc_port,) = [p for p in c["ports"] if p["name"] == "grpc"]
    assert grpc_port["containerPort"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        assert set(p) & {"grpc", "tcpSocket", "httpGet", "exec"} == {"grpc"}, probe   # grpc.health.v1, not TCP
        assert p["grpc"]["port"] == port
        assert p["grpc"].get("service", "") in ("", SERVICE)       # the names the server registers
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= WARMUP_BUDGET_S[profile]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_termination_grace_covers_prestop_and_the_servers_drain(profile):
    from uwrt.runtime.config import RuntimeConfig
    dep, c = _container(profile)
    grace_s = float(_flag(c["args"], "--grace-s") or RuntimeConfig().grace_s)
    pre_stop_s = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 5                                  # endpoint removal must reach clients first
    # + the process's exit after draining: 4-6 s of interpreter teardown measured on 2 loaded cores
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop_s + grace_s + EXIT_S


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_bundle_is_mounted_read_only_and_caches_are_writable(profile):
    dep, c = _container(profile)
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    bundle = _flag(c["args"], "--bundle")
    (mount,) = [m for m in c["volumeMounts"] if bundle.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
    for e in c["env"]:
        if e["name"] in ("UWRT_CACHE_DIR", "XDG_CACHE_HOME", "UWRT_STATE_DIR"):
            assert any(e["value"].startswith(w) for w in writable), e


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_resources(profile):
    _, c = _container(profile)
    res = c["resources"]
    assert res["requests"] == res["limits"]                 # Guaranteed QoS
    assert ("nvidia.com/gpu" in res["limits"]) is (profile == "gpu")


def test_objects_refer_to_each_other():
    dep = _one(DEPLOYMENTS["cpu"], "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    gpu = _one(DEPLOYMENTS["gpu"], "Deployment")             # a drop-in replacement: same name and labels
    assert gpu["metadata"]["name"] == dep["metadata"]["name"]
    assert gpu["spec"]["template"]["metadata"]["labels"] == labels
    svc = _one(K8S / "service.yaml", "Service")
    assert svc["spec"]["clusterIP"] == "None"                # headless: DNS lists every ready pod
    assert svc["spec"]["selector"].items() <= labels.items()
    _, c = _container("cpu")
    (sp,) = svc["spec"]["ports"]
    assert sp["targetPort"] in {p["name"] for p in c["ports"]} and sp["port"] == int(_flag(c["args"], "--port"))
    pdb = _one(K8S / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(K8S / "hpa.yaml", "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["maxUnavailable"] + 1
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
