"""Bundle authenticity: Ed25519 signatures over manifest.json, trusted keys, forged manifests,
the `bundle keygen | sign | verify` commands and the require_signature / trusted_keys knobs."""
from __future__ import annotations

import argparse
import base64
import json
import os
import stat

import pytest

from tests.runtime.bundle.helpers import flip_byte, manifest, save_manifest
from uwrt.runtime.bundle.bundle import load_bundle, sign_bundle
from uwrt.runtime.bundle.signing import SIGNATURE_FILE, generate_keypair, load_public_key
from uwrt.runtime.cli.bundle import register
from uwrt.runtime.cli.main import build_parser, config_from_args
from uwrt.runtime.config import RuntimeConfig
from uwrt.runtime.errors import BundleError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: 'ours' (trusted) and 'theirs' (an attacker's)."""
    d = tmp_path_factory.mktemp("keys")
    return {who: generate_keypair(d, name=who) for who in ("ours", "theirs")}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uwrt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_keygen_files_and_modes(tmp_path):
    priv, pub, kid = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_public_key(pub)[0] == kid and len(kid) == 32
    with pytest.raises(BundleError, match="exists"):
        generate_keypair(tmp_path / "k")
    assert generate_keypair(tmp_path / "k", overwrite=True)[2] != kid


def test_unsigned_bundle_loads_unless_required(bundle, keys):
    b = load_bundle(bundle.path)
    assert b.signature.state == "unsigned"
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(bundle.path, require_signature=True, trusted_keys=[keys["ours"][1]])
    with pytest.raises(BundleError, match="no trusted_keys are configured"):
        load_bundle(bundle.path, require_signature=True)


def test_good_signature_passes(bundle, keys):
    signed = sign_bundle(bundle.path, keys["ours"][0])
    assert signed.signature.state == "trusted" and signed.signature.trusted == (keys["ours"][2],)
    b = load_bundle(bundle.path, require_signature=True, trusted_keys=[keys["ours"][1]])
    assert b.signature.state == "trusted" and b.bundle_digest == bundle.bundle_digest
    # without trusted keys the signature is still checked, and reported as not trusted
    assert load_bundle(bundle.path).signature.state == "untrusted"


def test_signature_by_untrusted_key_fails(bundle, keys):
    sign_bundle(bundle.path, keys["theirs"][0])
    with pytest.raises(BundleError, match=rf"signed by {keys['theirs'][2]}, none of them a trusted key"):
        load_bundle(bundle.path, require_signature=True, trusted_keys=[keys["ours"][1]])
    assert load_bundle(bundle.path, trusted_keys=[keys["ours"][1]]).signature.state == "untrusted"


def test_two_signers_one_trusted(bundle, keys):
    sign_bundle(bundle.path, keys["theirs"][0])
    b = sign_bundle(bundle.path, keys["ours"][0])
    assert set(b.signature.signers) == {keys["ours"][2], keys["theirs"][2]}
    b = sign_bundle(bundle.path, keys["ours"][0])   # re-signing replaces, never duplicates
    assert len(b.signature.signers) == 2
    assert load_bundle(bundle.path, require_signature=True, trusted_keys=[keys["ours"][1]]).signature.trusted == (
        keys["ours"][2],)


@pytest.mark.parametrize("attack", ["keep_sig", "drop_sig", "resign_own_key"])
def test_forged_manifest_with_recomputed_digests_is_refused(bundle, keys, attack):
    """The issue's attack: rewrite the policy (approve everything) and a file, recompute every
    digest. Unsigned, that loads; with signatures required it never does."""
    sign_bundle(bundle.path, keys["ours"][0])
    m = manifest(bundle.path)
    m["policy"]["approve_max_pd"] = m["policy"]["counteroffer_max_pd"] = m["policy"]["review_max_pd"] = 0.99
    (bundle.path / "model_card.md").write_text("# Totally the same model\n")
    save_manifest(bundle.path, m, redigest=True)
    trusted = [keys["ours"][1]]
    if attack == "keep_sig":       # the old signature no longer matches the manifest: refused even unrequired
        with pytest.raises(BundleError, match="manifest.json changed after signing"):
            load_bundle(bundle.path)
        with pytest.raises(BundleError, match="manifest.json changed after signing"):
            load_bundle(bundle.path, require_signature=True, trusted_keys=trusted)
        return
    (bundle.path / SIGNATURE_FILE).unlink()
    assert load_bundle(bundle.path).policy.approve_max_pd == 0.99   # what happens without signatures
    if attack == "resign_own_key":
        sign_bundle(bundle.path, keys["theirs"][0])
    with pytest.raises(BundleError, match="is not signed" if attack == "drop_sig" else "none of them a trusted key"):
        load_bundle(bundle.path, require_signature=True, trusted_keys=trusted)


def test_tampered_signature_or_key_id(bundle, keys):
    sign_bundle(bundle.path, keys["ours"][0])
    p = bundle.path / SIGNATURE_FILE
    good = json.loads(p.read_text())
    doc = json.loads(p.read_text())
    sig = bytearray(base64.b64decode(doc["signatures"][0]["signature"]))
    sig[5] ^= 1
    doc["signatures"][0]["signature"] = base64.b64encode(bytes(sig)).decode()
    p.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="does not verify: manifest.json was forged or edited after signing"):
        load_bundle(bundle.path)
    # claiming the trusted key's id for another key's signature
    doc = json.loads(json.dumps(good))
    doc["signatures"][0]["public_key"] = base64.b64encode(load_public_key(keys["theirs"][1])[1]).decode()
    p.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="key_id does not match its public key"):
        load_bundle(bundle.path)
    p.write_text("{not json")
    with pytest.raises(BundleError, match="manifest.sig: not valid JSON"):
        load_bundle(bundle.path)
    p.write_text(json.dumps(good))
    assert load_bundle(bundle.path).signature.state == "untrusted"


def test_private_key_readable_by_others_is_refused(bundle, keys, tmp_path):
    priv = tmp_path / "loose.key"
    priv.write_bytes(keys["ours"][0].read_bytes())
    os.chmod(priv, 0o644)
    with pytest.raises(BundleError, match="accessible by group/others.*chmod 600"):
        sign_bundle(bundle.path, priv)
    assert not (bundle.path / SIGNATURE_FILE).exists()


def test_sign_refuses_a_broken_bundle(bundle, keys):
    flip_byte(bundle.path / "trees.ubj")
    with pytest.raises(BundleError, match="trees.ubj"):
        sign_bundle(bundle.path, keys["ours"][0])
    assert not (bundle.path / SIGNATURE_FILE).exists()


def test_cli_keygen_sign_verify_inspect(bundle, tmp_path, capsys):
    assert _cli(["bundle", "keygen", "--out", str(tmp_path / "k")]) == 0
    priv, pub = tmp_path / "k" / "bundle-signing.key", tmp_path / "k" / "bundle-signing.pub"
    kid = load_public_key(pub)[0]
    assert kid in capsys.readouterr().out
    d = str(bundle.path)
    assert _cli(["bundle", "verify", d]) == 0 and "unsigned" in capsys.readouterr().out
    assert _cli(["bundle", "verify", d, "--pubkey", str(pub)]) == 3
    assert "not signed by any of" in capsys.readouterr().err
    assert _cli(["bundle", "sign", d, "--key", str(priv)]) == 0 and kid in capsys.readouterr().out
    assert _cli(["bundle", "verify", d, "--pubkey", str(pub)]) == 0
    assert f"trusted key {kid}" in capsys.readouterr().out
    assert _cli(["bundle", "inspect", d]) == 0 and f"signed by {kid}" in capsys.readouterr().out
    assert _cli(["bundle", "inspect", d, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature"] == {"state": "untrusted", "signers": [kid], "trusted": []}
    m = manifest(bundle.path)
    m["policy"]["approve_max_pd"] = 0.5
    m["policy"]["counteroffer_max_pd"] = m["policy"]["review_max_pd"] = 0.6
    save_manifest(bundle.path, m, redigest=True)
    assert _cli(["bundle", "verify", d, "--pubkey", str(pub)]) == 2
    assert "changed after signing" in capsys.readouterr().err
    assert _cli(["bundle", "verify", d, "--pubkey", str(tmp_path / "missing.pub")]) == 2


def test_config_knobs(bundle, keys, tmp_path):
    with pytest.raises(ValueError, match="require_signature needs trusted_keys"):
        RuntimeConfig(require_signature=True)
    cfg = RuntimeConfig.load(env={"UWRT_REQUIRE_SIGNATURE": "true", "UWRT_TRUSTED_KEYS": f"{keys['ours'][1]}, "})
    assert cfg.require_signature and cfg.trusted_key_paths() == (str(keys["ours"][1]),)
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(bundle.path, config=cfg)
    sign_bundle(bundle.path, keys["ours"][0])
    assert load_bundle(bundle.path, config=cfg).signature.state == "trusted"
    args = build_parser().parse_args(["serve", "--require-signature", "yes", "--trusted-keys",
                                      f"{keys['theirs'][1]},{keys['ours'][1]}"])
    flags = config_from_args(args)
    assert flags.require_signature and len(flags.trusted_key_paths()) == 2
    assert load_bundle(bundle.path, config=flags).signature.trusted == (keys["ours"][2],)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--require-signature", "maybe"])
    assert not config_from_args(build_parser().parse_args(["serve"])).require_signature


def test_score_refuses_an_unsigned_bundle_when_required(bundle, keys, tmp_path, monkeypatch, capsys):
    """The pipeline's loader enforces the knobs (uwrt serve goes through the same Pipeline.from_dir)."""
    from uwrt.runtime.cli.main import main
    (tmp_path / "in.jsonl").write_text("")
    monkeypatch.setenv("UWRT_REQUIRE_SIGNATURE", "1")
    monkeypatch.setenv("UWRT_TRUSTED_KEYS", str(keys["ours"][1]))
    assert main(["score", "--bundle", str(bundle.path), "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "is not signed" in capsys.readouterr().err
    sign_bundle(bundle.path, keys["theirs"][0])
    assert main(["score", "--bundle", str(bundle.path), "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "none of them a trusted key" in capsys.readouterr().err
