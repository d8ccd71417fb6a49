"""The model bundle: the unit of deployment and audit.

A bundle is a directory::

    manifest.json          identity + description of everything below (pretty, sorted keys)
    encoder.safetensors    encoder weights (non-executable format)
    trees.ubj              XGBoost Booster as UBJSON
    model_card.json/.md    optional; digested like every other file
    manifest.sig           optional Ed25519 signature(s) over manifest.json (signing.py)
    cache/                 reserved for compile caches; never digested (runtime/bundle/cache_trust.py
                           says when an entry in it may be used)

`manifest["files"]` pins every file but manifest.json by size and SHA-256, and
`bundle_digest` is the SHA-256 of the canonical JSON of the manifest without
"bundle_digest" and "created_at", so it pins every file and a deterministic build of the
same parts gives the same digest. Any other file in the directory is refused.

Primitives: `write_bundle` (build from in-memory parts, atomically), `load_bundle`
(verify and open), `sign_bundle`, `export_parts` (the inverse of `create_from_parts`, which
backs `uwrt bundle create`).

Imports: verifying a bundle needs neither torch nor xgboost (`load_bundle(...,
check_trees_with_xgboost=False)` is what `uwrt bundle inspect` / `verify` run): weights are
checked through `safetensors` as numpy arrays and the tree model's header is read from its
UBJSON (ubjson.py). torch is imported by `Bundle.encoder_state` and `write_bundle`, xgboost by
the default (full) `load_bundle`, which also opens the trees with xgboost.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from uwrt.runtime import __version__
from uwrt.runtime.bundle.schema import EncoderConfig, FeatureSchema, Policy, check_state_dict
from uwrt.runtime.bundle.signing import (
    SIGNATURE_FILE,
    SignatureStatus,
    check_signatures,
    load_private_key,
    load_trusted_keys,
    read_signature_file,
    sign_manifest,
    signature_doc,
    write_signature_file,
)
from uwrt.runtime.bundle.ubjson import TreeHeader, tree_header
from uwrt.runtime.errors import BundleError
from uwrt.runtime.pb import pb

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import xgboost

    from uwrt.runtime.config import RuntimeConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "Bundle", "write_bundle", "load_bundle", "sign_bundle",
           "create_from_parts", "export_parts", "compute_digest"]

log = logging.getLogger("uwrt.bundle")

FORMAT = "uwrt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.safetensors"
TREES_FILE = "trees.ubj"
CACHE_DIR = "cache"
OBJECTIVE = "binary:logistic"
DEFAULT_CREATED_BY = f"uwrt {__version__}"
_RESERVED = (MANIFEST, ENCODER_FILE, TREES_FILE, SIGNATURE_FILE)
_CHUNK_BYTES = 1 << 20
_DIGEST_EXCLUDED = ("bundle_digest", "created_at")
_REQUIRED_KEYS = {"format": str, "format_version": int, "bundle_id": str, "created_at": str,
                  "created_by": str, "components": dict, "feature_schema": dict,
                  "encoder_config": dict, "policy": dict, "files": dict, "bundle_digest": str}
#: safetensors dtype -> numpy dtype, for the weight checks (BF16 is widened by hand below)
_ST_FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Returned by `load_bundle` / `write_bundle`.

    `signature` is what `load_bundle` found in manifest.sig (every signature verified; whether a
    signer is trusted depends on the trusted keys it was given).
    Thread safety: immutable after construction (treat `manifest` as read-only); every
    method only reads files, so a Bundle may be shared across threads.
    """
    path: pathlib.Path
    manifest: dict
    bundle_id: str
    bundle_digest: str
    schema: FeatureSchema
    encoder_config: EncoderConfig
    policy: Policy
    tree_version: str
    signature: SignatureStatus = SignatureStatus("unsigned")

    def __hash__(self) -> int:  # the manifest dict is unhashable; digest + path identify a bundle
        return hash((self.bundle_digest, str(self.path)))

    def _file(self, component: str) -> str:
        return self.manifest["components"][component]["file"]

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """Encoder weights (CPU torch tensors; imports torch). The bytes are re-hashed against
        the manifest before they are parsed, so what is loaded is exactly what was verified.
        Thread safe."""
        from safetensors.torch import load as st_load
        return st_load(_read_verified(self.path, self._file("encoder"), self.manifest["files"]))

    def tree_model_path(self) -> pathlib.Path:
        """Path of the UBJSON tree model (verified at load time; load it promptly, or use
        `tree_model_bytes` to load exactly the verified bytes). Thread safe."""
        return self.path / self._file("trees")

    def tree_model_bytes(self) -> bytearray:
        """The tree model's bytes, re-hashed against the manifest; pass to
        `xgboost.Booster().load_model(...)`. Thread safe."""
        return bytearray(_read_verified(self.path, self._file("trees"), self.manifest["files"]))

    def identity(self) -> pb.ModelIdentity:
        """The audit identity carried by every decision. Thread safe."""
        return pb.ModelIdentity(
            bundle_id=self.bundle_id, bundle_digest=self.bundle_digest,
            encoder_version=self.encoder_config.version, tree_version=self.tree_version,
            feature_schema_version=self.schema.version, policy_version=self.policy.version)


# ------------------------------------------------------------------------------------------
# hashing

def compute_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of `manifest` without bundle_digest/created_at."""
    body = {k: v for k, v in manifest.items() if k not in _DIGEST_EXCLUDED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256_file(path: pathlib.Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _check_entry(rel: str, sha: str, size: int, entry: Mapping[str, Any]) -> None:
    if size != entry["bytes"]:
        raise BundleError(f"{rel}: {size} bytes on disk but the manifest says {entry['bytes']}: "
                          "tampered or corrupt")
    if sha != entry["sha256"]:
        raise BundleError(f"{rel}: SHA-256 {sha[:12]}... does not match the manifest's "
                          f"{str(entry['sha256'])[:12]}...: tampered or corrupt")


def _read_verified(root: pathlib.Path, rel: str, files: Mapping[str, Any]) -> bytes:
    """Read a listed file whole and check it against its manifest entry."""
    try:
        data = (root / rel).read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{rel}: listed in manifest.json but missing from {root}") from None
    except OSError as e:
        raise BundleError(f"{rel}: cannot read: {e}") from None
    _check_entry(rel, hashlib.sha256(data).hexdigest(), len(data), files[rel])
    return data


def _check_rel_path(rel: str) -> None:
    p = pathlib.PurePosixPath(rel)
    if (not rel or "\\" in rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/"))
            or rel in (MANIFEST, SIGNATURE_FILE) or p.parts[0] == CACHE_DIR):
        raise BundleError(f"bad bundle file name {rel!r}: must be a plain relative path, not "
                          f"{MANIFEST} or {SIGNATURE_FILE} and not under {CACHE_DIR}/")


# ------------------------------------------------------------------------------------------
# compatibility checks (shared by write and load, so nothing incompatible is ever written)

def _check_compat(schema: FeatureSchema, cfg: EncoderConfig, state: Mapping[str, Any],
                  trees: TreeHeader) -> None:
    if cfg.emb_dim != schema.embedding_dim:
        raise BundleError(f"encoder_config.emb_dim={cfg.emb_dim} but feature_schema "
                          f"{schema.version!r} has {schema.embedding_dim} embedding columns")
    try:
        check_state_dict(cfg, dict(state))
    except ValueError as e:
        raise BundleError(f"{ENCODER_FILE}: weights do not fit encoder_config "
                          f"{cfg.version!r}: {e}") from None
    n = trees.num_features
    if n != len(schema.features):
        raise BundleError(f"{TREES_FILE}: tree model expects {n} features but feature_schema "
                          f"{schema.version!r} lists {len(schema.features)}")
    names = trees.feature_names
    if names is not None and list(names) != schema.names:
        raise BundleError(f"{TREES_FILE}: tree model feature names differ from feature_schema "
                          f"{schema.version!r} (first mismatch at column "
                          f"{next(i for i, (a, b) in enumerate(zip(names, schema.names, strict=True)) if a != b)})")
    if trees.objective != OBJECTIVE:
        raise BundleError(f"{TREES_FILE}: tree model objective is {trees.objective!r}, expected {OBJECTIVE!r}")


def _booster_header(booster: xgboost.Booster) -> TreeHeader:
    names = booster.feature_names
    return TreeHeader(num_features=booster.num_features(),
                      objective=json.loads(booster.save_config())["learner"]["objective"]["name"],
                      feature_names=tuple(names) if names else None, num_trees=booster.num_boosted_rounds())


def _booster_from_bytes(data: bytes, what: str) -> xgboost.Booster:
    import xgboost
    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(data))
    except xgboost.core.XGBoostError as e:
        raise BundleError(f"{what}: not a readable XGBoost model: {str(e).splitlines()[0]}") from None
    return booster


def _header_from_bytes(data: bytes, what: str) -> TreeHeader:
    try:
        return tree_header(data)
    except ValueError as e:
        raise BundleError(f"{what}: not a readable XGBoost model: {e}") from None


def _numpy_state(blob: bytes, what: str) -> dict[str, np.ndarray]:
    """Encoder weights as numpy arrays (no torch), for the shape and finiteness checks."""
    import safetensors
    try:
        flat = safetensors.deserialize(blob)
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise BundleError(f"{what}: not a readable safetensors file: {e}") from None
    out: dict[str, np.ndarray] = {}
    for name, view in flat:
        dtype, buf = view["dtype"], view["data"]
        if dtype == "BF16":   # the upper half of a float32
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_FLOAT_DTYPES:
            arr = np.frombuffer(buf, _ST_FLOAT_DTYPES[dtype])
        else:
            raise BundleError(f"{what}: tensor {name!r} has dtype {dtype}; encoder weights must be floating point")
        out[name] = arr.reshape(view["shape"])
    return out


# ------------------------------------------------------------------------------------------
# load

def load_bundle(path: PathLike, *, check_trees_with_xgboost: bool = True, require_signature: bool = False,
                trusted_keys: Iterable[PathLike] = (), config: RuntimeConfig | None = None) -> Bundle:
    """Open and fully verify a bundle; raise BundleError naming the problem and the file.

    Checks, in order: directory and manifest present; manifest parses; format and
    format_version; required keys; bundle_digest; manifest.sig (every signature must verify;
    with `require_signature`, one must be by a key in `trusted_keys`, PEM public key files);
    no file in the directory that the manifest does not declare (`cache/` and manifest.sig
    excepted); every listed file present with its size and SHA-256; schema/config/policy parse;
    encoder weights fit the config (shapes, finite); the tree model's header (feature count,
    names, objective) fits the schema; with `check_trees_with_xgboost` (default) the tree
    model also opens in xgboost and agrees with its header. `config` adds its
    `require_signature` and `trusted_keys` (runtime/config.py).
    torch is never imported here; xgboost only with `check_trees_with_xgboost`.
    Thread safety: reads only; safe to call concurrently.
    """
    keys = [pathlib.Path(k) for k in trusted_keys]
    if config is not None:
        require_signature = require_signature or config.require_signature
        keys += [pathlib.Path(k) for k in config.trusted_key_paths()]
    root = pathlib.Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    mpath = root / MANIFEST
    try:
        if mpath.is_symlink():
            raise BundleError(f"{MANIFEST}: must be a regular file, not a symbolic link")
        raw = mpath.read_bytes()
        m = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{MANIFEST} is missing from {root}: not a bundle") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{MANIFEST}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{MANIFEST}: not valid JSON ({e}): tampered or corrupt") from None
    if not isinstance(m, dict):
        raise BundleError(f"{MANIFEST}: must be a JSON object")
    if m.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: format is {m.get('format')!r}, expected {FORMAT!r}: not a uwrt bundle")
    ver = m.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise BundleError(f"{MANIFEST}: unsupported format_version {ver!r}")
    if ver > FORMAT_VERSION:
        raise BundleError(f"{MANIFEST}: bundle format_version {ver} is newer than this uwrt supports "
                          f"({FORMAT_VERSION}): upgrade uwrt")
    for key, typ in _REQUIRED_KEYS.items():
        if not isinstance(m.get(key), typ):
            raise BundleError(f"{MANIFEST}: key {key!r} missing or not a {typ.__name__}")
    digest = compute_digest(m)
    if digest != m["bundle_digest"]:
        raise BundleError(f"{MANIFEST}: bundle_digest mismatch (manifest edited after the bundle was "
                          f"built): recorded {m['bundle_digest'][:12]}..., computed {digest[:12]}...")
    # the signature before anything else is parsed: a forged bundle is refused unread
    signature = _check_signature(root, raw, m["bundle_digest"], require_signature, keys)

    files = m["files"]
    comps = m["components"]
    try:
        enc_file, tree_file = comps["encoder"]["file"], comps["trees"]["file"]
        tree_version, tree_nf = str(comps["trees"]["version"]), comps["trees"]["num_features"]
        enc_version = comps["encoder"]["version"]
    except (KeyError, TypeError):
        raise BundleError(f"{MANIFEST}: components must describe 'encoder' (file, version) and "
                          "'trees' (file, version, num_features)") from None
    for rel in (enc_file, tree_file):
        if rel not in files:
            raise BundleError(f"{MANIFEST}: component file {rel!r} is not listed under 'files'")
    for rel, entry in files.items():
        _check_rel_path(rel)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise BundleError(f"{MANIFEST}: files[{rel!r}] must have 'sha256' and 'bytes'")
    _refuse_undeclared(root, files)
    blobs: dict[str, bytes] = {}
    for rel, entry in files.items():
        if rel in (enc_file, tree_file):  # parsed below: hash exactly the bytes we parse
            blobs[rel] = _read_verified(root, rel, files)
            continue
        if not (root / rel).is_file():
            raise BundleError(f"{rel}: listed in manifest.json but missing from {root}")
        _check_entry(rel, *_sha256_file(root / rel), entry)

    try:
        schema = FeatureSchema.from_dict(m["feature_schema"])
        cfg = EncoderConfig.from_dict(m["encoder_config"])
        policy = Policy.from_dict(m["policy"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{MANIFEST}: invalid feature_schema / encoder_config / policy: {e}") from None
    if enc_version != cfg.version:
        raise BundleError(f"{MANIFEST}: components.encoder.version {enc_version!r} != "
                          f"encoder_config.version {cfg.version!r}")
    state = _numpy_state(blobs[enc_file], enc_file)
    header = _header_from_bytes(blobs[tree_file], tree_file)
    if tree_nf != header.num_features:
        raise BundleError(f"{MANIFEST}: components.trees.num_features={tree_nf} but {tree_file} "
                          f"has {header.num_features}")
    if check_trees_with_xgboost:
        booster = _booster_header(_booster_from_bytes(blobs[tree_file], tree_file))
        if (booster.num_features, booster.objective, booster.feature_names) != (
                header.num_features, header.objective, header.feature_names):
            raise BundleError(f"{tree_file}: xgboost reads {booster} but the model's header says {header}")
    _check_compat(schema, cfg, state, header)
    return Bundle(path=root, manifest=m, bundle_id=m["bundle_id"], bundle_digest=m["bundle_digest"],
                  schema=schema, encoder_config=cfg, policy=policy, tree_version=tree_version,
                  signature=signature)


def _check_signature(root: pathlib.Path, manifest_bytes: bytes, digest: str, required: bool,
                     keys: list[pathlib.Path]) -> SignatureStatus:
    if required and not keys:
        raise BundleError("a signed bundle is required (require_signature) but no trusted_keys are configured")
    doc = read_signature_file(root)
    if doc is None and not required:
        return SignatureStatus("unsigned")
    status = check_signatures(doc, manifest_bytes, digest, load_trusted_keys(keys))
    if required and status.state != "trusted":
        why = ("is not signed (no manifest.sig)" if status.state == "unsigned" else
               f"is signed by {', '.join(status.signers)}, none of them a trusted key "
               f"({', '.join(str(k) for k in keys)})")
        raise BundleError(f"bundle {root} {why}; require_signature is set: sign it with `uwrt bundle sign`")
    return status


def _refuse_undeclared(root: pathlib.Path, files: Mapping[str, Any]) -> None:
    """Every entry of the bundle directory must be declared: a listed file (a regular file, not
    a symbolic link), a directory holding one, manifest.json, manifest.sig or `cache/`."""
    allowed = set(files) | {MANIFEST, SIGNATURE_FILE, CACHE_DIR}   # `cache` is reserved even when not a directory
    dirs = {p.as_posix() for rel in files for p in pathlib.PurePosixPath(rel).parents if p.as_posix() != "."}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(root).as_posix())
        for d in sorted(dirnames):
            rel = (rel_dir / d).as_posix()
            if rel == CACHE_DIR:
                continue
            if os.path.islink(os.path.join(dirpath, d)) or rel not in dirs:
                raise BundleError(f"{rel}/: not declared in {MANIFEST}; refusing a bundle with undeclared "
                                  "content (remove it, or rebuild the bundle with it)")
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix() != CACHE_DIR]
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if rel not in allowed:
                raise BundleError(f"{rel}: not declared in {MANIFEST}; refusing a bundle with undeclared "
                                  "files (remove it, or rebuild the bundle with it)")
            if os.path.islink(os.path.join(dirpath, name)) and rel != CACHE_DIR:
                raise BundleError(f"{rel}: must be a regular file, not a symbolic link")


def sign_bundle(path: PathLike, private_key: PathLike) -> Bundle:
    """Verify the bundle, then add (or replace) this key's signature in its manifest.sig.
    Returns the bundle as loaded with that key trusted. Existing signatures by other keys are
    kept (they must still verify). Thread safety: one signer per bundle at a time."""
    key = load_private_key(private_key)
    b = load_bundle(path, check_trees_with_xgboost=False)
    raw = (b.path / MANIFEST).read_bytes()
    if compute_digest(json.loads(raw)) != b.bundle_digest:
        raise BundleError(f"{MANIFEST} changed while it was being signed")
    entry = sign_manifest(raw, key)
    old = read_signature_file(b.path)
    entries = [e for e in (old or {}).get("signatures", []) if e.get("key_id") != entry["key_id"]]
    write_signature_file(b.path, signature_doc(raw, b.bundle_digest, entries + [entry]))
    from cryptography.hazmat.primitives import serialization
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "signer.pub").write_bytes(pub)
        return load_bundle(b.path, check_trees_with_xgboost=False, require_signature=True,
                           trusted_keys=[pathlib.Path(tmp) / "signer.pub"])


# ------------------------------------------------------------------------------------------
# write

def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tree_bytes(tree_model: xgboost.Booster | PathLike) -> tuple[bytes, xgboost.Booster]:
    """UBJSON bytes of a Booster or of a saved model (.ubj or .json; content decides)."""
    import xgboost
    if isinstance(tree_model, xgboost.Booster):
        booster = tree_model
    else:
        p = pathlib.Path(tree_model)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BundleError(f"tree model {p}: cannot read: {e}") from None
        booster = _booster_from_bytes(data, f"tree model {p}")
    return bytes(booster.save_raw("ubj")), booster


def _extra_bytes(name: str, value: bytes | str | PathLike) -> bytes:
    """bytes as-is; str is text (UTF-8); a pathlib.Path / os.PathLike is a file to copy."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        try:
            data = pathlib.Path(value).read_bytes()
        except OSError as e:
            raise BundleError(f"{name}: cannot read {value}: {e}") from None
    if name.endswith(".json"):
        try:
            json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{name}: not valid JSON: {e}") from None
    return data


def write_bundle(out_dir: PathLike, *, bundle_id: str, encoder_state: Mapping[str, torch.Tensor],
                 encoder_config: EncoderConfig, tree_model: xgboost.Booster | PathLike,
                 tree_version: str, schema: FeatureSchema, policy: Policy,
                 extra_files: Mapping[str, bytes | str | PathLike] | None = None,
                 created_by: str = DEFAULT_CREATED_BY, overwrite: bool = False) -> Bundle:
    """Validate the parts, write a bundle atomically and return it as `load_bundle` sees it.

    Everything `load_bundle` checks is checked before anything is written. The files go to a
    temporary directory beside `out_dir`, which is then renamed into place; a non-empty
    `out_dir` is refused unless `overwrite` (then it is replaced whole, `cache/` included).
    `extra_files` maps a relative path (e.g. "model_card.json") to bytes, text (str) or a
    path to copy. Identical inputs give an identical `bundle_digest`.
    Thread safety: safe to call concurrently for different `out_dir`s; two writers to the same
    `out_dir` race (the last rename wins; with overwrite=False one of them may fail).
    """
    extra_files = dict(extra_files or {})
    if not bundle_id or not str(tree_version):
        raise BundleError("bundle_id and tree_version must be non-empty")
    out = pathlib.Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise BundleError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")

    import torch
    from safetensors.torch import save as st_save
    state = {}
    for k, v in encoder_state.items():
        if not isinstance(v, torch.Tensor):
            raise BundleError(f"{ENCODER_FILE}: encoder_state[{k!r}] is not a tensor")
        state[k] = v.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    tree_data, booster = _tree_bytes(tree_model)
    _check_compat(schema, encoder_config, state, _booster_header(booster))
    blobs = {ENCODER_FILE: st_save(state), TREES_FILE: tree_data}
    for name, value in sorted(extra_files.items()):
        _check_rel_path(name)
        if name in _RESERVED:
            raise BundleError(f"extra file {name!r} collides with a file the bundle writes itself")
        blobs[name] = _extra_bytes(name, value)

    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bundle_id": bundle_id,
        "created_at": _utc_now(), "created_by": created_by,
        "components": {
            "encoder": {"file": ENCODER_FILE, "version": encoder_config.version},
            "trees": {"file": TREES_FILE, "version": str(tree_version),
                      "num_features": booster.num_features(), "objective": OBJECTIVE}},
        "feature_schema": schema.to_dict(), "encoder_config": encoder_config.to_dict(),
        "policy": policy.to_dict(),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for name, data in blobs.items()},
    }
    manifest = json.loads(json.dumps(manifest))  # normalise (tuples -> lists) as a reader sees it
    manifest["bundle_digest"] = compute_digest(manifest)
    blobs[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, data in blobs.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out)


def _install(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rename `tmp` to `out`, moving an existing `out` aside first (restored on failure)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:  # make the rename durable
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------
# parts on disk <-> bundle

def _read_json(path: PathLike, what: str) -> dict:
    p = pathlib.Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise BundleError(f"{what} {p}: cannot read: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{what} {p}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise BundleError(f"{what} {p}: must be a JSON object")
    return d


def create_from_parts(out_dir: PathLike, *, trees: PathLike, encoder_weights: PathLike,
                      encoder_config: PathLike, feature_schema: PathLike, policy: PathLike,
                      bundle_id: str | None = None, tree_version: str | None = None,
                      model_card: PathLike | None = None, model_card_md: PathLike | None = None,
                      request_limits: PathLike | None = None,
                      created_by: str = DEFAULT_CREATED_BY, overwrite: bool = False,
                      extra_files: Mapping[str, bytes | str | PathLike] | None = None) -> Bundle:
    """Build a bundle from externally trained parts on disk (backs `uwrt bundle create`).

    Shortcut for: read the three JSON files with `EncoderConfig/FeatureSchema/Policy.from_dict`
    (`request_limits`, a RequestLimits JSON file, replaces the schema's "limits"),
    `safetensors.torch.load_file(encoder_weights)`, then `write_bundle(...)` (which validates
    everything before writing). Defaults: `tree_version` = "<trees file stem>-<sha256[:8]>",
    `bundle_id` = "uwrt-<sha256[:12]>" over the parts, so identical parts give identical ids.
    `extra_files`: more declared files, as `write_bundle` takes them.
    `export_parts` writes these parts back out from a bundle. Thread safety: as `write_bundle`.
    """
    try:
        cfg = EncoderConfig.from_dict(_read_json(encoder_config, "encoder config"))
        schema_doc = _read_json(feature_schema, "feature schema")
        if request_limits is not None:
            schema_doc["limits"] = _read_json(request_limits, "request limits")
        schema = FeatureSchema.from_dict(schema_doc)
        pol = Policy.from_dict(_read_json(policy, "policy"))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"invalid encoder config / feature schema (or request limits) / policy: {e}") from None
    try:
        from safetensors.torch import load as st_load
        w = pathlib.Path(encoder_weights).read_bytes()
        state = st_load(w)
    except OSError as e:
        raise BundleError(f"encoder weights {encoder_weights}: cannot read: {e}") from None
    except Exception as e:  # safetensors' own error type
        raise BundleError(f"encoder weights {encoder_weights}: not a safetensors file: {e}") from None
    tree_data, booster = _tree_bytes(trees)
    if tree_version is None:
        tree_version = f"{pathlib.Path(trees).stem}-{hashlib.sha256(tree_data).hexdigest()[:8]}"
    extra: dict[str, bytes | str | PathLike] = {}
    if model_card is not None:
        extra["model_card.json"] = pathlib.Path(model_card)
    if model_card_md is not None:
        extra["model_card.md"] = pathlib.Path(model_card_md)
    extra.update(extra_files or {})         # e.g. monitoring.json (runtime/monitoring/drift.py)
    if bundle_id is None:
        h = hashlib.sha256()
        for part in (tree_data, w, json.dumps([cfg.to_dict(), schema.to_dict(), pol.to_dict(),
                                               tree_version], sort_keys=True).encode()):
            h.update(hashlib.sha256(part).digest())
        bundle_id = f"uwrt-{h.hexdigest()[:12]}"
    return write_bundle(out_dir, bundle_id=bundle_id, encoder_state=state, encoder_config=cfg,
                        tree_model=booster, tree_version=tree_version, schema=schema, policy=pol,
                        extra_files=extra, created_by=created_by, overwrite=overwrite)


def export_parts(bundle: Bundle, out_dir: PathLike) -> dict[str, pathlib.Path]:
    """Write a bundle's parts as `create_from_parts` reads them; returns its keyword arguments
    (trees, encoder_weights, encoder_config, feature_schema, policy[, model_card, model_card_md]).
    Re-creating with the same bundle_id, tree_version and created_by gives the same digest.
    Thread safety: reads the bundle only; safe for different `out_dir`s.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"trees": out / TREES_FILE, "encoder_weights": out / ENCODER_FILE,
             "encoder_config": out / "encoder_config.json",
             "feature_schema": out / "feature_schema.json", "policy": out / "policy.json"}
    parts["trees"].write_bytes(bundle.tree_model_bytes())
    parts["encoder_weights"].write_bytes(
        _read_verified(bundle.path, bundle._file("encoder"), bundle.manifest["files"]))
    for key, obj in (("encoder_config", bundle.encoder_config), ("feature_schema", bundle.schema),
                     ("policy", bundle.policy)):
        parts[key].write_text(json.dumps(obj.to_dict(), indent=2, sort_keys=True) + "\n")
    for key, name in (("model_card", "model_card.json"), ("model_card_md", "model_card.md")):
        if name in bundle.manifest["files"]:
            parts[key] = out / name
            parts[key].write_bytes(_read_verified(bundle.path, name, bundle.manifest["files"]))
    return parts
