"""Caches are derived data and never trusted on their own word (runtime/bundle/cache_trust.py):
the two attacks from the issue (a modified ONNX graph with its sidecar recomputed; a replaced
.so with its meta.json recomputed, whose constructor must never run), untrusted cache dirs and
entries, and the cache key's own checks."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.runtime.bundle.helpers import CFG
from uwrt.runtime.bundle import cache_trust
from uwrt.runtime.bundle.cache_trust import CacheTrustError, cache_key
from uwrt.runtime.encoders import onnx_encoder
from uwrt.runtime.encoders.onnx_encoder import cache_dir_for, export_onnx, load_or_export
from uwrt.runtime.trees import cache as native_cache
from uwrt.runtime.trees.cache import build_shared_library, cache_stats

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
NOBODY = 65534

TOY_C = "#include \"toy.h\"\nint toy_value(void) { return TOY_K; }\n"
# what an attacker puts in the cache: same symbol, and a constructor that runs on dlopen
EVIL_C = """#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen(MARKER, "w"); if (f) { fputs("constructor ran", f); fclose(f); }
}
int toy_value(void) { return -1; }
"""


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    """A private state dir (the cache key) per test."""
    d = tmp_path / "state"
    monkeypatch.setenv("UWRT_STATE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def enc_state():
    from tests.runtime.bundle.helpers import make_parts
    return make_parts()["encoder_state"]


def toy(k: int) -> dict:
    return {"toy.c": TOY_C, "toy.h": f"#define TOY_K {k}\n"}


def build(dirs, k=7, **kw):
    return build_shared_library("toy", toy(k), {"v": "1"}, dirs, progress=lambda m: None, **kw)


def recompute_meta(entry: pathlib.Path, so: pathlib.Path, mac: str | None = "keep") -> None:
    """What an attacker with write access to the cache can do: fix size and hash (and forge a MAC
    under a key of their own, when asked)."""
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    data = so.read_bytes()
    meta.update(so_bytes=len(data), so_sha256=native_cache.sha256_bytes(data))
    if mac is None:
        meta.pop("mac", None)
    elif mac != "keep":
        meta["mac"] = cache_trust.sign_meta(bytes.fromhex(mac), meta)
    meta_path.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------ the key

def test_key_created_private_and_stable(state):
    k = cache_key()
    assert len(k) == 32 and cache_key() == k
    assert oct((state / "cache.key").stat().st_mode & 0o777) == "0o600"
    assert oct(state.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(state, mode):
    cache_key()
    os.chmod(state / "cache.key", mode)
    with pytest.raises(CacheTrustError, match="accessible by group/others.*chmod 600"):
        cache_key()


def test_key_symlink_malformed_and_state_dir_checks(state, tmp_path):
    cache_key()
    real = tmp_path / "elsewhere.key"
    shutil.move(state / "cache.key", real)
    (state / "cache.key").symlink_to(real)
    with pytest.raises(CacheTrustError):
        cache_key()
    (state / "cache.key").unlink()
    (state / "cache.key").write_text("not hex")
    os.chmod(state / "cache.key", 0o600)
    with pytest.raises(CacheTrustError, match="malformed"):
        cache_key()
    (state / "cache.key").unlink()
    os.chmod(state, 0o777)
    with pytest.raises(CacheTrustError, match="state directory.*writable by group/others"):
        cache_key()


@ROOT_ONLY
def test_key_owned_by_another_user_is_refused(state):
    cache_key()
    os.chown(state / "cache.key", NOBODY, NOBODY)
    with pytest.raises(CacheTrustError, match="owned by uid 65534"):
        cache_key()


def test_bad_key_means_no_cache_is_used_or_written(state, tmp_path, enc_state):
    cdir = tmp_path / "native"
    good = build([cdir])
    assert good.built and good.cache_dir == cdir
    os.chmod(state / "cache.key", 0o644)
    n = cache_stats()["uncached_builds"]
    k0 = cache_trust.trust_stats()["key_errors"]
    lib = build([cdir])
    assert lib.built and lib.cache_dir != cdir and lib.lib.toy_value() == 7     # rebuilt, not reused
    assert cache_stats()["uncached_builds"] == n + 1 and cache_trust.trust_stats()["key_errors"] == k0 + 1
    odir = tmp_path / "onnx"
    odir.mkdir()
    assert load_or_export(CFG, enc_state, cache_dir=odir)[1] == "export-uncached"
    assert not list(odir.iterdir())


# ------------------------------------------------------------------------------------------ attack 1: ONNX

@pytest.mark.parametrize("forged_mac", ["keep", "own-key", None])
def test_tampered_onnx_graph_with_recomputed_sidecar_is_not_served(tmp_path, enc_state, forged_mac):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    cdir = tmp_path / "onnx"
    cdir.mkdir()
    data, how = load_or_export(CFG, enc_state, cache_dir=cdir, attention="matmul")
    assert how == "export" and load_or_export(CFG, enc_state, cache_dir=cdir, attention="matmul")[1] == "cache"
    model_path = next(cdir.glob("*.onnx"))
    # the attack: scale the output projection (every answer changes) and fix up the sidecar
    m = onnx.load_from_string(data)
    for init in m.graph.initializer:
        if init.name.startswith("pool.b"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 5.0, init.name))
    evil = m.SerializeToString()
    assert evil != data
    model_path.write_bytes(evil)
    meta = json.loads(model_path.with_suffix(".json").read_text())
    meta.update(bytes=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    if forged_mac is None:
        meta.pop("mac")
    elif forged_mac == "own-key":
        meta["mac"] = cache_trust.sign_meta(b"\x01" * 32, meta)
    model_path.with_suffix(".json").write_text(json.dumps(meta))
    before = onnx_encoder.cache_stats()
    served, how = load_or_export(CFG, enc_state, cache_dir=cdir, attention="matmul")
    assert how == "export" and served == export_onnx(CFG, enc_state, attention="matmul") != evil
    after = onnx_encoder.cache_stats()
    assert after["rejected"] == before["rejected"] + 1 and after["untrusted"] == before["untrusted"] + 1
    assert model_path.read_bytes() == served                 # the entry was replaced by a good one
    # and the served graph computes what the weights say
    rng = np.random.default_rng(0)
    from uwrt.runtime.encoders.onnx_encoder import bucket_lengths, onnx_feed
    from uwrt.runtime.featurize import PackedEvents
    lens = rng.integers(1, CFG.max_history + 1, 5)
    T = int(lens.sum())
    ev = PackedEvents(rng.integers(1, CFG.n_event_types, T), rng.integers(0, CFG.mcc_buckets, T),
                      rng.normal(size=(T, CFG.n_numeric)).astype(np.float32),
                      np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), int(lens.max()))
    feed = onnx_feed(ev, bucket_lengths(CFG.max_history))

    def run(model: bytes) -> np.ndarray:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        return sess.run(["emb"], {k: v for k, v in feed.items() if k in names})[0]
    assert not np.allclose(run(evil), run(served))
    np.testing.assert_array_equal(run(served), run(data))


def test_onnx_cache_dir_world_writable_or_foreign_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bundle = tmp_path / "bundle"
    (bundle / "cache" / "onnx").mkdir(parents=True)
    assert cache_dir_for(bundle) == bundle / "cache" / "onnx"
    os.chmod(bundle / "cache" / "onnx", 0o777)
    n = onnx_encoder.cache_stats()["untrusted_dirs"]
    assert cache_dir_for(bundle) == tmp_path / "xdg" / "uwrt" / "onnx"
    assert onnx_encoder.cache_stats()["untrusted_dirs"] == n + 1
    os.chmod(tmp_path / "xdg" / "uwrt" / "onnx", 0o775)      # group writable too: nothing left
    assert cache_dir_for(bundle) is None


# ------------------------------------------------------------------------------------------ attack 2: .so

@pytest.mark.parametrize("forged_mac", ["keep", "own-key", None])
def test_replaced_so_with_recomputed_meta_is_never_loaded(tmp_path, forged_mac):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (cc/gcc)")
    cdir = tmp_path / "native"
    first = build([cdir])
    assert first.built and first.lib.toy_value() == 7
    marker = tmp_path / "constructor-ran"
    evil_c = tmp_path / "evil.c"
    evil_c.write_text(EVIL_C)
    evil_so = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(evil_so), str(evil_c)], check=True)
    # sanity: this library's constructor does write the marker when loaded
    probe = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(evil_so)!r})"])
    assert probe.returncode == 0 and marker.exists()
    marker.unlink()
    entry_so = first.entry
    shutil.copyfile(evil_so, entry_so)
    recompute_meta(entry_so.parent, entry_so, mac="01" * 32 if forged_mac == "own-key" else forged_mac)
    before = cache_stats()
    lib = build([cdir])
    after = cache_stats()
    assert not marker.exists(), "the replaced library's constructor ran"
    assert lib.built and lib.lib.toy_value() == 7
    assert after["untrusted"] == before["untrusted"] + 1 and after["corrupt"] == before["corrupt"] + 1
    assert not marker.exists()
    again = build([cdir])                                      # the rebuilt entry is ours again
    assert not again.built and again.lib.toy_value() == 7 and not marker.exists()


def test_world_writable_cache_dir_is_skipped(tmp_path):
    shared, mine = tmp_path / "shared", tmp_path / "mine"
    first = build([shared])
    assert first.cache_dir == shared
    os.chmod(shared, 0o777)
    n = cache_stats()["untrusted_dirs"]
    lib = build([shared, mine])
    assert lib.built and lib.cache_dir == mine and cache_stats()["untrusted_dirs"] == n + 1
    assert build([shared, mine]).cache_dir == mine
    os.chmod(shared, 0o755)
    os.chmod(first.entry.parent, 0o777)                       # an entry dir anyone can write: rejected
    n = cache_stats()["untrusted"]
    again = build([shared])
    assert again.built and cache_stats()["untrusted"] == n + 1


def test_symlinked_entry_files_are_rejected(tmp_path):
    cdir = tmp_path / "native"
    first = build([cdir])
    real = tmp_path / "real.so"
    shutil.copyfile(first.entry, real)
    first.entry.unlink()
    first.entry.symlink_to(real)
    n = cache_stats()["untrusted"]
    assert build([cdir]).built and cache_stats()["untrusted"] == n + 1


def test_another_key_means_rebuild(tmp_path, monkeypatch):
    """Caches made under another key (another user, or a build machine) are rebuilt, not trusted."""
    cdir = tmp_path / "native"
    assert build([cdir]).built
    assert not build([cdir]).built
    monkeypatch.setenv("UWRT_STATE_DIR", str(tmp_path / "other-state"))
    n = cache_stats()["untrusted"]
    assert build([cdir]).built and cache_stats()["untrusted"] == n + 1


@ROOT_ONLY
def test_read_only_bundle_cache_built_by_another_user(tmp_path):
    """The deployment case: caches built at build time by another user, bundle read-only for the
    server. The server's own cache dir gets the rebuild; the foreign one is never loaded."""
    bundle_cache, user_cache = tmp_path / "bundle" / "cache" / "native", tmp_path / "user"
    first = build([bundle_cache])
    for p in [bundle_cache, *bundle_cache.rglob("*")]:
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    n = cache_stats()["untrusted_dirs"]
    lib = build([bundle_cache, user_cache])
    assert lib.built and lib.cache_dir == user_cache and cache_stats()["untrusted_dirs"] == n + 1
    assert first.entry.exists()                                # the foreign entry is left alone
    # an entry owned by another user inside a directory we own is rejected too
    os.chown(bundle_cache, os.geteuid(), os.getegid())
    n = cache_stats()["untrusted"]
    lib = build([bundle_cache, user_cache])
    assert cache_stats()["untrusted"] == n + 1 and lib.lib.toy_value() == 7


def test_loaded_library_is_a_private_verified_copy(tmp_path):
    lib = build([tmp_path / "native"])
    assert lib.path != lib.entry and lib.path.read_bytes() == lib.entry.read_bytes()
    priv = lib.path.parent
    assert priv == cache_trust.private_dir() and oct(priv.stat().st_mode & 0o777) == "0o700"
