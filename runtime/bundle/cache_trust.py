"""When a derived cache entry (an exported ONNX graph, a compiled tree library) may be used.

A cache is derived data: the server could always rebuild it from the verified bundle, so it
must never trust an entry merely because its own metadata says it is fine: whoever can write a
cache directory (e.g. a bundle's `cache/` on shared storage) could otherwise swap in a modified
ONNX graph with its sidecar hash recomputed (every answer changes, responses still carry the
bundle's digest), or a shared library whose constructor runs inside the server on `dlopen`.

Two rules, both required (runtime/trees/cache.py and runtime/encoders/onnx_encoder.py apply them):

1. **A key the cache's writers do not hold.** `cache_key()` is 32 random bytes in the server
   user's private state directory (`$UWRT_STATE_DIR`, else `$XDG_STATE_HOME/uwrt`, else
   `~/.local/state/uwrt`; created 0700, the key file 0600 on first use). Every entry's metadata
   carries `mac` = HMAC-SHA256(key, canonical JSON of the metadata), and the metadata holds the
   SHA-256 of the payload, the cache key and the entry's kind: an entry verifies only if this
   server user made it. The payload is read once, checked against the metadata, and exactly
   those bytes are used (a shared library is first copied into a private directory and loaded
   from there, so nothing can be swapped between the check and `dlopen`). A key that is not a
   regular file owned by the server user, or that group/others can read, is refused
   (CacheTrustError): caches are then not used at all and everything is rebuilt (logged).
2. **Directories only the server user can write.** A cache directory (and an entry directory or
   file in it) that is group/world writable or owned by another user is skipped with a warning,
   and the next cache directory is used. So a read-only bundle whose caches were built by
   another user at build time is never trusted: the server rebuilds into its own cache dir.

Counters (`trust_stats()`): key_errors, untrusted_dirs, untrusted_entries.
Thread safety: functions only read/create files; the counters are lock-protected.
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import pathlib
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["CacheTrustError", "UntrustedCacheFile", "KEY_FILE", "state_dir", "cache_key", "sign_meta", "verify_meta",
           "untrusted_dir_reason", "untrusted_file_reason", "read_trusted_file", "private_dir", "trust_stats",
           "count"]

log = logging.getLogger("uwrt.cache")

KEY_FILE = "cache.key"
_KEY_BYTES = 32
_MAC_FIELD = "mac"

_stats_lock = threading.Lock()
_stats = {"key_errors": 0, "untrusted_dirs": 0, "untrusted_entries": 0}
_private: pathlib.Path | None = None


class CacheTrustError(RuntimeError):
    """The cache key cannot be used safely (see the module docstring)."""


class UntrustedCacheFile(ValueError):
    """A cache file is not a regular file, is owned by another user or is group/world writable."""


def trust_stats() -> dict[str, int]:
    """Process-wide counters: key_errors, untrusted_dirs, untrusted_entries. Thread safe."""
    with _stats_lock:
        return dict(_stats)


def count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


def state_dir() -> pathlib.Path:
    """The server user's private state directory: $UWRT_STATE_DIR, $XDG_STATE_HOME/uwrt or
    ~/.local/state/uwrt."""
    env = os.environ.get("UWRT_STATE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return pathlib.Path(base) / "uwrt"


def _owner_mode_reason(st: os.stat_result, what: str, *, readable_ok: bool = True) -> str | None:
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"{what} is owned by uid {st.st_uid}, not by the server user (uid {euid})"
    bad = 0o022 if readable_ok else 0o077
    if st.st_mode & bad:
        return (f"{what} has mode {stat.S_IMODE(st.st_mode):o}: "
                f"{'writable' if readable_ok else 'accessible'} by group/others")
    return None


def untrusted_dir_reason(path: str | os.PathLike) -> str | None:
    """Why a cache directory may not be used (None: owned by this user, not group/world
    writable). A symbolic link to a directory is judged by its target."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat: {e}"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    return _owner_mode_reason(st, f"directory {path}")


def untrusted_file_reason(st: os.stat_result, path: str | os.PathLike) -> str | None:
    """Why a cache file (lstat/fstat result) may not be used: not a regular file, another owner,
    group/world writable."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return _owner_mode_reason(st, f"file {path}")


def read_trusted_file(path: pathlib.Path, max_bytes: int = 1 << 31) -> bytes:
    """The bytes of a cache file that passes `untrusted_file_reason` (checked on the open file
    itself; a symbolic link is never followed): UntrustedCacheFile when it does not, FileNotFoundError
    when it is missing, ValueError for other failures."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        if os.path.islink(path):
            raise UntrustedCacheFile(f"{path} is a symbolic link") from None
        raise ValueError(f"cannot open {path}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        why = untrusted_file_reason(os.fstat(f.fileno()), path)
        if why:
            raise UntrustedCacheFile(why)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes")
    return data


def cache_key(*, create: bool = True) -> bytes:
    """The server user's cache key (created on first use); CacheTrustError if it cannot be
    used safely: the state directory or the key file owned by someone else or writable by
    group/others, the key readable by group/others, not a regular file, or malformed."""
    d = state_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CacheTrustError(f"cannot create the state directory {d}: {e}") from None
    why = untrusted_dir_reason(d)
    if why:
        raise CacheTrustError(f"state directory: {why}; fix it (chmod 700) or set UWRT_STATE_DIR")
    path = d / KEY_FILE
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | nofollow)
        except FileNotFoundError:
            if not create:
                raise CacheTrustError(f"no cache key at {path}") from None
            try:
                wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
            except FileExistsError:
                continue                                    # another process created it meanwhile
            except OSError as e:
                raise CacheTrustError(f"cannot create the cache key {path}: {e}") from None
            with os.fdopen(wfd, "w") as f:
                f.write(secrets.token_hex(_KEY_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("created the cache key %s (mode 0600)", path)
            continue
        except OSError as e:
            raise CacheTrustError(f"cannot open the cache key {path}: {e}") from None
        with os.fdopen(fd, "r") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CacheTrustError(f"cache key {path} is not a regular file")
            why = _owner_mode_reason(st, f"cache key {path}", readable_ok=False)
            if why:
                raise CacheTrustError(f"{why}; chmod 600 it (or delete it: a new key only costs a rebuild)")
            text = f.read(4 * _KEY_BYTES).strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != _KEY_BYTES:
            raise CacheTrustError(f"cache key {path} is malformed (want {2 * _KEY_BYTES} hex digits); delete it")
        return key
    raise CacheTrustError(f"cannot create or read the cache key {path}")


def _canonical(meta: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != _MAC_FIELD}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign_meta(key: bytes, meta: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) of the metadata's canonical JSON (without its own "mac" field)."""
    return hmac.new(key, b"uwrt-cache-entry-v1\n" + _canonical(meta), hashlib.sha256).hexdigest()


def verify_meta(key: bytes, meta: Mapping[str, Any]) -> bool:
    """True iff meta["mac"] is this key's MAC over the rest of meta (constant-time compare)."""
    mac = meta.get(_MAC_FIELD)
    return isinstance(mac, str) and hmac.compare_digest(mac, sign_meta(key, meta))


def private_dir() -> pathlib.Path:
    """A directory only this process writes (created 0700, removed at exit): verified shared
    libraries are copied here and loaded from here. Under the state directory when it is
    usable (the system temp dir may be mounted noexec), else under the system temp dir."""
    global _private
    with _stats_lock:
        if _private is not None and _private.is_dir():
            return _private
        parent: pathlib.Path | None = None
        try:
            cand = state_dir() / "lib"
            cand.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not (untrusted_dir_reason(cand) or untrusted_dir_reason(cand.parent)):
                _prune_stale(cand)
                parent = cand
        except OSError:
            pass
        _private = pathlib.Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
        atexit.register(shutil.rmtree, _private, True)
        return _private


def _prune_stale(parent: pathlib.Path) -> None:
    """Remove private dirs left by processes that no longer exist (named '<pid>-...')."""
    for p in parent.iterdir():
        pid = p.name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
