"""Bundle signatures: Ed25519 over the exact bytes of manifest.json, kept in `manifest.sig`.

manifest.json pins every file of the bundle by SHA-256 and size, so a signature over its bytes
pins the whole bundle; anyone who can write the bundle directory can recompute the digests of
a forged manifest, but not a signature by a key they do not hold. The private key stays outside
the bundle (e.g. on the build machine or in a KMS-backed signer); servers hold only public keys.

    manifest.sig = {"format": "uwrt-bundle-signature", "format_version": 1,
                    "bundle_digest": ..., "manifest_sha256": ...,
                    "signatures": [{"algorithm": "ed25519", "key_id": ..., "public_key": b64,
                                    "signature": b64}, ...]}

A signature is Ed25519(SIGNING_CONTEXT + manifest bytes); `key_id` is the first 16 bytes (hex)
of SHA-256 over the raw 32-byte public key. Several signatures may be present (key rotation);
every one must verify, and a bundle counts as signed by a trusted key when at least one signer's
key_id is among the trusted public keys. The embedded public key only lets `inspect` check a
signature without the key file: it never makes a signer trusted.

Keys are PEM files (`uwrt bundle keygen`): the private key PKCS#8 unencrypted, written 0600
(a private key readable by group or others is refused, as ssh does), the public key
SubjectPublicKeyInfo. `cryptography` is imported only when a signature is made or checked.
Thread safety: pure functions over their arguments and files.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from uwrt.runtime.errors import BundleError

__all__ = ["SIGNATURE_FILE", "SIGNING_CONTEXT", "SignatureStatus", "generate_keypair", "load_private_key",
           "load_public_key", "load_trusted_keys", "key_id", "sign_manifest", "check_signatures",
           "read_signature_file", "write_signature_file"]

SIGNATURE_FILE = "manifest.sig"
SIG_FORMAT = "uwrt-bundle-signature"
SIG_FORMAT_VERSION = 1
ALGORITHM = "ed25519"
#: Domain separation: a uwrt bundle signature can never be replayed as a signature of anything else.
SIGNING_CONTEXT = b"uwrt-bundle-manifest-signature-v1\n"
MAX_SIGNATURE_FILE_BYTES = 1 << 16

PathLike = str | os.PathLike


@dataclass(frozen=True)
class SignatureStatus:
    """The outcome of checking a bundle's signatures (an invalid one raises BundleError instead).

    state: "unsigned" (no manifest.sig), "trusted" (every signature verifies and at least one
    signer is a trusted key) or "untrusted" (every signature verifies, no signer is trusted,
    e.g. no trusted keys were given)."""
    state: str
    signers: tuple[str, ...] = ()      # key ids of every (verified) signature
    trusted: tuple[str, ...] = ()      # those among the trusted keys

    def describe(self) -> str:
        if self.state == "unsigned":
            return "unsigned"
        who = ", ".join(self.signers)
        if self.state == "trusted":
            return f"signed by {who}: valid, trusted key {', '.join(self.trusted)}"
        return f"signed by {who}: valid, but no signer is a trusted key"

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "signers": list(self.signers), "trusted": list(self.trusted)}


def key_id(raw_public_key: bytes) -> str:
    """Short fingerprint of a raw Ed25519 public key (hex of SHA-256's first 16 bytes)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise BundleError(f"{SIGNATURE_FILE}: {what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise BundleError(f"{SIGNATURE_FILE}: {what} is not valid base64") from None


# ------------------------------------------------------------------------------------------ keys

def generate_keypair(out_dir: PathLike, *, name: str = "bundle-signing", overwrite: bool = False
                     ) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Write `<name>.key` (private, PKCS#8 PEM, mode 0600) and `<name>.pub` (public PEM) in
    `out_dir` (created 0700 if missing); returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    out = pathlib.Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise BundleError(f"{p} exists; pass --overwrite to replace the key pair")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _write_atomic(priv_path, pem, 0o600)
    _write_atomic(pub_path, pub.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return priv_path, pub_path, key_id(raw)


def load_private_key(path: PathLike) -> Any:
    """An Ed25519 private key from a PEM file; refused when group/world readable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    p = pathlib.Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as e:
        raise BundleError(f"private key {p}: cannot read: {e}") from None
    if st.st_mode & 0o077:
        raise BundleError(f"private key {p} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
                          "chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"private key {p}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"private key {p}: not an Ed25519 key")
    return key


def load_public_key(path: PathLike) -> tuple[str, bytes]:
    """(key id, raw 32-byte key) from a PEM Ed25519 public key file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    p = pathlib.Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BundleError(f"public key {p}: cannot read: {e}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BundleError(f"public key {p}: not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {p}: not an Ed25519 key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id(raw), raw


def load_trusted_keys(paths: Iterable[PathLike]) -> dict[str, bytes]:
    """key id -> raw public key for every file in `paths`."""
    out: dict[str, bytes] = {}
    for p in paths:
        kid, raw = load_public_key(p)
        out[kid] = raw
    return out


# ------------------------------------------------------------------------------------------ sign

def sign_manifest(manifest_bytes: bytes, private_key: Any) -> dict[str, str]:
    """One signature entry for `manifest_bytes` (the exact bytes of manifest.json)."""
    from cryptography.hazmat.primitives import serialization
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"algorithm": ALGORITHM, "key_id": key_id(raw), "public_key": _b64(raw),
            "signature": _b64(private_key.sign(SIGNING_CONTEXT + manifest_bytes))}


def signature_doc(manifest_bytes: bytes, bundle_digest: str, entries: list[dict[str, str]]) -> dict[str, Any]:
    return {"format": SIG_FORMAT, "format_version": SIG_FORMAT_VERSION, "bundle_digest": bundle_digest,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "signatures": entries}


def read_signature_file(root: pathlib.Path) -> dict[str, Any] | None:
    """The parsed manifest.sig of a bundle directory, or None when there is none."""
    p = root / SIGNATURE_FILE
    try:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise BundleError(f"{SIGNATURE_FILE}: must be a regular file")
        if not p.exists():
            return None
        if p.stat().st_size > MAX_SIGNATURE_FILE_BYTES:
            raise BundleError(f"{SIGNATURE_FILE}: larger than {MAX_SIGNATURE_FILE_BYTES} bytes")
        doc = json.loads(p.read_bytes())
    except OSError as e:
        raise BundleError(f"{SIGNATURE_FILE}: cannot read: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{SIGNATURE_FILE}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{SIGNATURE_FILE}: must be a JSON object")
    return doc


def write_signature_file(root: pathlib.Path, doc: Mapping[str, Any]) -> pathlib.Path:
    path = root / SIGNATURE_FILE
    _write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    return path


def check_signatures(doc: Mapping[str, Any] | None, manifest_bytes: bytes, bundle_digest: str,
                     trusted: Mapping[str, bytes]) -> SignatureStatus:
    """Verify every signature in `doc` (a parsed manifest.sig, or None) over `manifest_bytes`.

    Raises BundleError when the file is malformed, was made for another manifest, or any
    signature fails to verify (a forged or edited manifest). Otherwise the status says whether
    a trusted key (key id -> raw public key) signed it."""
    if doc is None:
        return SignatureStatus("unsigned")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    if doc.get("format") != SIG_FORMAT or doc.get("format_version") != SIG_FORMAT_VERSION:
        raise BundleError(f"{SIGNATURE_FILE}: not a {SIG_FORMAT} v{SIG_FORMAT_VERSION} file")
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if doc.get("manifest_sha256") != actual or doc.get("bundle_digest") != bundle_digest:
        raise BundleError(f"{SIGNATURE_FILE}: was made for another manifest (manifest.json changed after "
                          f"signing: sha256 {actual[:12]}..., signed {str(doc.get('manifest_sha256'))[:12]}...); "
                          f"if the change is intended, delete {SIGNATURE_FILE} and sign again")
    entries = doc.get("signatures")
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{SIGNATURE_FILE}: 'signatures' must be a non-empty list")
    signers: list[str] = []
    ok: list[str] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or e.get("algorithm") != ALGORITHM:
            raise BundleError(f"{SIGNATURE_FILE}: signatures[{i}]: unsupported algorithm "
                              f"{e.get('algorithm') if isinstance(e, dict) else e!r}")
        raw = _unb64(e.get("public_key"), f"signatures[{i}].public_key")
        sig = _unb64(e.get("signature"), f"signatures[{i}].signature")
        if len(raw) != 32 or key_id(raw) != e.get("key_id"):
            raise BundleError(f"{SIGNATURE_FILE}: signatures[{i}]: key_id does not match its public key")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, SIGNING_CONTEXT + manifest_bytes)
        except InvalidSignature:
            raise BundleError(f"{SIGNATURE_FILE}: signatures[{i}] by key {e['key_id']} does not verify: "
                              "manifest.json was forged or edited after signing") from None
        signers.append(e["key_id"])
        if trusted.get(e["key_id"]) == raw:
            ok.append(e["key_id"])
    return SignatureStatus("trusted" if ok else "untrusted", tuple(signers), tuple(ok))


def _write_atomic(path: pathlib.Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
