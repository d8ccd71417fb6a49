"""A verified on-disk cache of shared libraries compiled from generated C (tree stages, TreeSHAP).

One primitive::

    build_shared_library(name, c_sources, key_parts, cache_dirs, *, cflags=DEFAULT_CFLAGS,
                         ldflags=("-lm",), progress=None, cc=None, jobs=None) -> CachedLibrary

* `c_sources`: {relative file name: text or bytes} (".c" files are compiled, everything else,
  e.g. headers, is only written beside them), or a zero-argument callable returning that dict.
  A callable is only called on a cache miss (generating C for a big model takes seconds), so
  its `key_parts` must then identify the sources completely (e.g. the model's sha256 and the
  generator's name/version/options); with a dict, the sources' own digest is in the key too.
* key = sha256 over: name, `key_parts`, the sources' digest (dict only), the compiler's
  resolved path and `cc --version`, cflags + ldflags, platform (system, machine, libc), the
  Python SOABI and `CACHE_FORMAT`. Two processes/machines agree on a key iff all of these do.
* An entry is the directory `<cache_dir>/<name>-<key[:24]>/` holding `lib<name>-<sha[:12]>.so`
  and `meta.json` (key, key_parts, the .so's file name, size and sha256, compiler, flags, build
  time, and `mac`: HMAC-SHA256 under the server user's cache key, runtime/bundle/cache_trust.py).
  Loading checks, before anything is loaded: the entry directory and its files are owned by the
  server user and not group/world writable, meta.json's MAC verifies (so this user built it),
  the key matches, and the .so's bytes match meta.json's size and sha256; then exactly those
  bytes are copied into a private directory (`cache_trust.private_dir()`) and `dlopen`ed from
  there (`CachedLibrary.path`; `CachedLibrary.entry` is the cache's copy). `dlopen` runs a
  library's constructors, so nothing unverified is ever opened. A rejected entry is logged
  (logger "uwrt.native"), counted (`cache_stats()["corrupt"]`, and `["untrusted"]` when the
  MAC or ownership failed), moved aside and rebuilt.
* `cache_dirs` are tried in order: a directory owned by another user or writable by
  group/others is skipped with a warning (counted `untrusted_dirs`); the first trusted one
  holding a valid entry is used; on a miss the library is built into the first trusted
  directory that is writable (a read-only bundle `cache/`, or one built by another user, falls
  through to the user cache, see `default_cache_dirs`). With no usable directory, or no usable
  cache key, the library is built in the private directory and not cached (logged, counted
  `uncached_builds`). `CachedLibrary.cache_dir` says which directory was used,
  `CachedLibrary.built` whether this call compiled.
* Writes are atomic: the entry is built in a temp directory inside the cache directory and
  renamed into place; a concurrent builder of the same key waits on a per-key `flock` and then
  loads the winner's entry instead of compiling twice (if locking is unavailable both compile
  and the first rename wins; the loser discards its copy).
* `progress(message: str)` receives a line per stage and a heartbeat every
  `PROGRESS_EVERY_S` seconds while gcc runs (big models take minutes); default: log at INFO.

Thread safety: `build_shared_library` may be called concurrently from several threads or
processes (per-key file lock + atomic rename); the counters behind `cache_stats()` are
lock-protected. The returned `ctypes.CDLL` is as thread safe as the code it wraps.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from uwrt.runtime.bundle import cache_trust

__all__ = ["CACHE_FORMAT", "DEFAULT_CFLAGS", "CachedLibrary", "NativeBuildError",
           "build_shared_library", "default_cache_dirs", "cache_stats", "reset_cache_stats",
           "sha256_bytes"]

log = logging.getLogger("uwrt.native")

#: Bumped when the entry layout or the key recipe changes (old entries then simply miss).
CACHE_FORMAT = "uwrt-native-cache-2"
DEFAULT_CFLAGS: tuple[str, ...] = ("-O3", "-fPIC", "-std=c99", "-fno-strict-aliasing")
PROGRESS_EVERY_S = 10.0
_META = "meta.json"

Sources = Mapping[str, str | bytes]
SourceArg = Sources | Callable[[], Sources]
Progress = Callable[[str], None]

_stats_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0, "builds": 0, "corrupt": 0, "untrusted": 0, "build_failures": 0,
          "unwritable_dirs": 0, "untrusted_dirs": 0, "uncached_builds": 0}


class NativeBuildError(RuntimeError):
    """Generating, compiling, linking or loading a native library failed."""


@dataclass(frozen=True)
class CachedLibrary:
    """A loaded cache entry: `lib` is the `ctypes.CDLL`, `path` the verified copy it was loaded
    from (in the process's private directory; load it again only from there), `entry` the .so
    inside the cache entry, `cache_dir` the cache directory it lives in, `built` True iff this
    call compiled it."""
    path: pathlib.Path
    key: str
    meta: dict
    lib: ctypes.CDLL = field(repr=False)
    cache_dir: pathlib.Path
    built: bool
    entry: pathlib.Path | None = None


def cache_stats() -> dict[str, int]:
    """Process-wide counters: hits, misses, builds, corrupt (entries rejected on load, for any
    reason), untrusted (of those, rejected for their MAC or ownership), build_failures,
    unwritable_dirs, untrusted_dirs (cache dirs skipped: another owner, group/world writable),
    uncached_builds (built in the private directory: no usable cache dir or key). Thread safe."""
    with _stats_lock:
        return dict(_stats)


def reset_cache_stats() -> None:
    """Zero the counters (tests). Thread safe."""
    with _stats_lock:
        for k in _stats:
            _stats[k] = 0


def _count(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dirs(bundle_path: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """[<bundle>/cache/native (if a bundle is given), $UWRT_CACHE_DIR or ~/.cache/uwrt/native].

    The bundle's `cache/` is reserved and never digested (runtime/bundle/bundle.py), so compiled
    libraries may live beside the model; a read-only bundle falls through to the user cache."""
    dirs = []
    if bundle_path is not None:
        dirs.append(pathlib.Path(bundle_path) / "cache" / "native")
    env = os.environ.get("UWRT_CACHE_DIR")
    user = pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "uwrt"
    dirs.append(user / "native")
    return dirs


# ------------------------------------------------------------------------------------------
# key

@functools.lru_cache(maxsize=8)
def _compiler_identity(cc: str) -> tuple[str, str]:
    path = shutil.which(cc)
    if path is None:
        raise NativeBuildError(f"C compiler {cc!r} not found on PATH (set $CC or install gcc)")
    path = os.path.realpath(path)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"cannot run {path} --version: {e}") from None
    return path, out.stdout.strip()


def _platform_identity() -> dict[str, str]:
    return {"system": platform.system(), "machine": platform.machine(),
            "libc": "-".join(platform.libc_ver()), "soabi": str(sysconfig.get_config_var("SOABI")),
            "python": sys.implementation.name}


def _sources_digest(sources: Sources) -> str:
    h = hashlib.sha256()
    for rel in sorted(sources):
        data = sources[rel]
        data = data.encode() if isinstance(data, str) else bytes(data)
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def _cache_key(name: str, key_parts: Mapping[str, str], src_digest: str | None, cc_path: str,
               cc_version: str, cflags: Iterable[str], ldflags: Iterable[str]) -> str:
    doc = {"format": CACHE_FORMAT, "name": name, "key_parts": {k: str(v) for k, v in key_parts.items()},
           "sources": src_digest, "cc": cc_path, "cc_version": cc_version, "cflags": list(cflags),
           "ldflags": list(ldflags), "platform": _platform_identity()}
    return sha256_bytes(json.dumps(doc, sort_keys=True).encode())


# ------------------------------------------------------------------------------------------
# load / verify

def _entry_dir(cache_dir: pathlib.Path, name: str, key: str) -> pathlib.Path:
    return cache_dir / f"{name}-{key[:24]}"


class _Rejected(Exception):
    """A cache entry that must not be used; `untrusted` when its MAC or ownership failed."""

    def __init__(self, why: str, *, untrusted: bool = False) -> None:
        super().__init__(why)
        self.untrusted = untrusted


def _verify_entry(entry: pathlib.Path, key: str, mac_key: bytes | None) -> tuple[pathlib.Path, dict, bytes]:
    """(so path in the entry, meta, the .so's verified bytes) or _Rejected. `mac_key` None: an
    entry this process just built in its private directory (nothing to authenticate)."""
    try:
        st = os.lstat(entry)
    except OSError as e:
        raise _Rejected(f"cannot stat: {e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _Rejected("not a directory", untrusted=True)
    why = cache_trust.untrusted_dir_reason(entry)
    if why:
        raise _Rejected(why, untrusted=True)
    try:
        raw = cache_trust.read_trusted_file(entry / _META, 1 << 20)
    except FileNotFoundError:
        raise _Rejected("meta.json missing") from None
    except ValueError as e:
        raise _Rejected(str(e), untrusted=isinstance(e, cache_trust.UntrustedCacheFile)) from None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Rejected(f"meta.json unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("so_file"), str) or "/" in meta["so_file"]:
        raise _Rejected("meta.json malformed")
    if mac_key is not None and not cache_trust.verify_meta(mac_key, meta):
        raise _Rejected("meta.json MAC does not verify (built by another user or key, or tampered)", untrusted=True)
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        raise _Rejected("meta.json key/format mismatch")
    so = entry / meta["so_file"]
    try:
        data = cache_trust.read_trusted_file(so)
    except FileNotFoundError:
        raise _Rejected(f"{meta['so_file']} missing") from None
    except ValueError as e:
        raise _Rejected(f"{meta['so_file']}: {e}", untrusted=isinstance(e, cache_trust.UntrustedCacheFile)) from None
    if len(data) != meta.get("so_bytes"):
        raise _Rejected(f"{meta['so_file']}: {len(data)} bytes, meta.json says {meta.get('so_bytes')}")
    digest = sha256_bytes(data)
    if digest != meta.get("so_sha256"):
        raise _Rejected(f"{meta['so_file']}: sha256 {digest[:12]}... != meta.json {str(meta.get('so_sha256'))[:12]}...")
    return so, meta, data


def _discard(entry: pathlib.Path) -> None:
    """Move a bad entry aside (atomic w.r.t. readers) and delete it."""
    aside = entry.with_name(f".bad-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _private_copy(data: bytes, meta: dict) -> pathlib.Path:
    """Write verified library bytes into the private directory (once per content) and return the path."""
    d = cache_trust.private_dir()
    path = d / f"lib{meta.get('name', 'lib')}-{meta['so_sha256']}.so"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o500)
        os.replace(tmp, path)
    return path


def _try_load(cache_dir: pathlib.Path, name: str, key: str, mac_key: bytes | None, *,
              discard_bad: bool) -> CachedLibrary | None:
    entry = _entry_dir(cache_dir, name, key)
    if not os.path.lexists(entry):
        return None
    try:
        so, meta, data = _verify_entry(entry, key, mac_key)
    except _Rejected as rej:
        log.warning("native cache: entry %s rejected (%s); it will be rebuilt", entry, rej)
        _count("corrupt")
        if rej.untrusted:
            _count("untrusted")
            cache_trust.count("untrusted_entries")
        if discard_bad:
            _discard(entry)
        return None
    loaded = so if mac_key is None else _private_copy(data, meta)
    try:
        lib = ctypes.CDLL(str(loaded))
    except OSError as e:
        log.warning("native cache: entry %s verified but dlopen failed (%s); it will be rebuilt", entry, e)
        _count("corrupt")
        if discard_bad:
            _discard(entry)
        return None
    return CachedLibrary(path=loaded, key=key, meta=meta, lib=lib, cache_dir=cache_dir, built=False, entry=so)


# ------------------------------------------------------------------------------------------
# build

def _writable(d: pathlib.Path) -> bool:
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)   # never group/world writable, whatever the umask
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


class _KeyLock:
    """Exclusive flock on <cache_dir>/.<name>-<key>.lock (no-op where flock is unavailable)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _KeyLock:
        try:
            import fcntl
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError) as e:
            log.debug("native cache: no lock on %s (%s)", self.path, e)
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock


def _run_jobs(cmds: list[list[str]], cwd: pathlib.Path, jobs: int, progress: Progress, what: str) -> None:
    t0 = time.monotonic()
    done = 0

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        pending = {ex.submit(run, c): c for c in cmds}
        while pending:
            finished, _ = cf.wait(pending, timeout=PROGRESS_EVERY_S, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                cmd = pending.pop(fut)
                res = fut.result()
                if res.returncode != 0:
                    for f in pending:
                        f.cancel()
                    raise NativeBuildError(f"{what}: `{' '.join(cmd)}` failed (exit {res.returncode}):\n"
                                           f"{res.stderr[-4000:]}")
                done += 1
            if len(cmds) > 1 or not finished:
                progress(f"{what}: {done}/{len(cmds)} compile units done, {time.monotonic() - t0:.0f} s")


def _build(cache_dir: pathlib.Path, name: str, key: str, key_parts: Mapping[str, str], sources: Sources,
           cc_path: str, cc_version: str, cflags: list[str], ldflags: list[str], jobs: int,
           progress: Progress, mac_key: bytes | None) -> pathlib.Path:
    """Compile into a temp dir inside cache_dir, then rename it to the entry dir. Returns the entry."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir))
    try:
        src = tmp / "src"
        units = []
        for rel, data in sources.items():
            p = src / rel
            if pathlib.PurePosixPath(rel).is_absolute() or ".." in pathlib.PurePosixPath(rel).parts:
                raise NativeBuildError(f"bad source file name {rel!r}")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
            if rel.endswith(".c"):
                units.append(rel)
        if not units:
            raise NativeBuildError(f"{name}: no .c files among the sources {sorted(sources)}")
        nbytes = sum(len(v) for v in sources.values())
        progress(f"compiling {name}: {len(units)} unit(s), {nbytes / 1e6:.1f} MB of C, {jobs} job(s)")
        t0 = time.monotonic()
        objs = [f"{u[:-2]}.o" for u in sorted(units)]
        _run_jobs([[cc_path, *cflags, "-c", u, "-o", o] for u, o in zip(sorted(units), objs, strict=True)],
                  src, jobs, progress, f"compiling {name}")
        out_tmp = (tmp / "lib.so").absolute()
        _run_jobs([[cc_path, "-shared", *cflags, "-o", str(out_tmp), *objs, *ldflags]], src, 1, progress,
                  f"linking {name}")
        seconds = time.monotonic() - t0
        digest = _sha256_file(out_tmp)
        so_file = f"lib{name}-{digest[:12]}.so"
        os.rename(out_tmp, tmp / so_file)
        shutil.rmtree(src)
        meta = {"format": CACHE_FORMAT, "name": name, "key": key,
                "key_parts": {k: str(v) for k, v in key_parts.items()}, "so_file": so_file,
                "so_bytes": (tmp / so_file).stat().st_size, "so_sha256": digest, "cc": cc_path,
                "cc_version": cc_version.splitlines()[0] if cc_version else "", "cflags": cflags,
                "ldflags": ldflags, "platform": _platform_identity(), "build_seconds": round(seconds, 2),
                "source_bytes": nbytes, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if mac_key is not None:
            meta["mac"] = cache_trust.sign_meta(mac_key, meta)
        with open(tmp / _META, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp / _META, 0o644)       # explicit modes: a umask of 002 must not make them group writable
        os.chmod(tmp / so_file, 0o755)
        os.chmod(tmp, 0o755)
        entry = _entry_dir(cache_dir, name, key)
        try:
            os.rename(tmp, entry)  # atomic; fails if another builder already installed this key
        except OSError:
            if not entry.exists():
                raise
            log.info("native cache: %s was installed concurrently; keeping the existing entry", entry)
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"compiled {name} in {seconds:.1f} s -> {entry}")
        return entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_shared_library(name: str, c_sources: SourceArg, key_parts: Mapping[str, str],
                         cache_dirs: Iterable[str | os.PathLike], *, cflags: Iterable[str] = DEFAULT_CFLAGS,
                         ldflags: Iterable[str] = ("-lm",), progress: Progress | None = None,
                         cc: str | None = None, jobs: int | None = None) -> CachedLibrary:
    """Load `name` from the first cache dir holding a valid entry for this key, else compile it
    into the first writable one and load it. See the module docstring for the key and the
    entry format. Raises NativeBuildError (generation/compile/link/load failure, no writable
    cache dir). Thread safe (per-key file lock + atomic rename)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"library name must be [A-Za-z0-9._-]+, got {name!r}")
    progress = progress or (lambda msg: log.info("%s", msg))
    cflags, ldflags = list(cflags), list(ldflags)
    cc_path, cc_version = _compiler_identity(cc or os.environ.get("CC", "cc"))
    sources: Sources | None = None if callable(c_sources) else dict(c_sources)
    if sources is None and not key_parts:
        raise ValueError("with a source callable, key_parts must identify the sources "
                         "(model digest, generator version)")
    key = _cache_key(name, key_parts, None if sources is None else _sources_digest(sources), cc_path,
                     cc_version, cflags, ldflags)
    dirs = [pathlib.Path(d).absolute() for d in cache_dirs]  # gcc runs in a temp cwd
    if not dirs:
        raise ValueError("cache_dirs is empty")
    mac_key = _mac_key()

    trusted = []
    for d in dirs:
        why = cache_trust.untrusted_dir_reason(d) if d.exists() else None
        if why and d.is_dir():
            log.warning("native cache: %s skipped: %s; trying the next cache dir", d, why)
            _count("untrusted_dirs")
            cache_trust.count("untrusted_dirs")
            continue
        trusted.append(d)
    if mac_key is not None:
        for d in trusted:  # fast path, no lock: a hit anywhere
            if d.is_dir():
                hit = _try_load(d, name, key, mac_key, discard_bad=os.access(d, os.W_OK))
                if hit is not None:
                    _count("hits")
                    return hit

    target = None
    if mac_key is not None:
        for d in trusted:
            if _writable(d) and cache_trust.untrusted_dir_reason(d) is None:
                target = d
                break
            log.warning("native cache: %s is not writable; trying the next cache dir", d)
            _count("unwritable_dirs")
    if target is None:
        log.warning("native cache: no usable cache dir among %s%s: building %s uncached, in a private directory",
                    [str(d) for d in dirs], "" if mac_key is not None else " (no usable cache key)", name)
        _count("uncached_builds")
        target, mac_key = cache_trust.private_dir(), None

    with _KeyLock(target / f".{name}-{key[:24]}.lock"):
        hit = _try_load(target, name, key, mac_key, discard_bad=True)  # someone may have built it meanwhile
        if hit is not None:
            _count("hits")
            return hit
        _count("misses")
        try:
            if sources is None:
                t0 = time.monotonic()
                progress(f"generating C for {name}")
                sources = dict(c_sources())  # type: ignore[operator]
                progress(f"generated C for {name} in {time.monotonic() - t0:.1f} s")
            _build(target, name, key, key_parts, sources, cc_path, cc_version, cflags, ldflags,
                   jobs or os.cpu_count() or 1, progress, mac_key)
        except NativeBuildError:
            _count("build_failures")
            raise
        except Exception as e:
            _count("build_failures")
            raise NativeBuildError(f"building {name} failed: {type(e).__name__}: {e}") from e
        _count("builds")
        loaded = _try_load(target, name, key, mac_key, discard_bad=True)
    if loaded is None:
        _count("build_failures")
        raise NativeBuildError(f"{name}: freshly built entry in {target} failed verification/loading")
    return dataclasses.replace(loaded, built=True)


def _mac_key() -> bytes | None:
    """The cache key, or None (logged at ERROR, counted) when it cannot be used safely."""
    try:
        return cache_trust.cache_key()
    except cache_trust.CacheTrustError as e:
        log.error("native cache: %s; compiled libraries will not be cached or reused", e)
        cache_trust.count("key_errors")
        return None
