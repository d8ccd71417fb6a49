"""Compile every Triton kernel variant for real GPU targets on a machine with no GPU.

    python -m uwrt.kernels.compile_check [--arch 80,90] [--only SUBSTRING] [--full] [--jobs N] [--fresh] [--ptxas-info]

The interpreter (TRITON_INTERPRET=1, what the tests use without a GPU) accepts code the GPU
compiler rejects (e.g. `tl.dot` tiles under 16, layout or shared-memory limits). This compiles
each variant listed by the op modules through the full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX
-> cubin with the wheel's ptxas) for `GPUTarget("cuda", arch, 32)`; it needs no CUDA driver.

Registry: each module in `MODULES` exposes `COMPILE_VARIANTS`, a list of
`(kernel, signature, constexprs, label[, options])` tuples: `signature` maps every kernel
argument to a Triton type string ("*fp16", "i32", "fp32", or "constexpr" for the constexprs),
`constexprs` maps constexpr names to values, `options` holds compile options such as
`num_warps` / `num_stages`, plus an optional `divisible_16` list of argument names the compiler may
assume 16-divisible (default: every pointer and every integer argument named `stride*`, which is
what Triton's launcher specializes for our real shapes: aligned allocations, row strides that are
multiples of 16 elements; without it loads are compiled unvectorized and register counts are
meaningless). `COMPILE_VARIANTS_EXTRA` (optional, same format) lists slow-to-compile
variants checked only with `--full`. Adding an op module is a one-line change to `MODULES`; a module that
does not exist yet is skipped with a note. Prints one line per (variant, arch) and exits 1 if any
variant fails (or if no variant was found).

TRITON_INTERPRET must be unset when the kernels are defined (`@triton.jit` returns interpreter
objects otherwise): if it is set, this module re-runs itself in a child process without it.

Thread safety: a command-line tool; not meant to be imported by serving code.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator

#: Op modules whose COMPILE_VARIANTS are compiled (one line per module; missing ones are skipped).
MODULES = (
    "uwrt.kernels.attention",
    "uwrt.kernels.attn_block",
    "uwrt.kernels.ln_qkv", "uwrt.kernels.mlp", "uwrt.kernels.epilogue", "uwrt.kernels.prologue",
)


def _interpret_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def collect(modules=None, *, full: bool = False) -> tuple[list[tuple], list[str]]:
    """(variants, notes): every module's COMPILE_VARIANTS (+ COMPILE_VARIANTS_EXTRA if full) as 5-tuples."""
    variants, notes = [], []
    for name in (MODULES if modules is None else modules):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                notes.append(f"skip {name}: module not found")
                continue
            raise
        vs = getattr(mod, "COMPILE_VARIANTS", None)
        if vs is None:
            notes.append(f"skip {name}: no COMPILE_VARIANTS")
            continue
        if full:
            vs = list(vs) + list(getattr(mod, "COMPILE_VARIANTS_EXTRA", []))
        for v in vs:
            fn, sig, const, label = v[:4]
            opts = dict(v[4]) if len(v) > 4 else {}
            variants.append((fn, sig, const, label, opts))
    return variants, notes


def compile_one(fn, signature: dict, constexprs: dict, options: dict, arch: int):
    """Compile one variant for sm_<arch>; returns the CompiledKernel (raises on any failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)} is {type(fn).__name__}, not a JITFunction "
                        "(was TRITON_INTERPRET set when the kernels were imported?)")
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"signature lacks arguments {missing}")
    options = dict(options)
    div16 = options.pop("divisible_16", None)
    if div16 is None:
        div16 = [a for a in fn.arg_names
                 if signature[a].startswith("*") or (a.startswith("stride") and signature[a] in ("i32", "i64"))]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_info(ptx: str, arch: int) -> str:
    """ptxas -v's register and spill summary for one kernel's PTX (diagnostic only)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in r.stderr.splitlines() if "Used" in ln or "spill" in ln]
    return "; ".join(lines) if r.returncode == 0 else f"ptxas -v failed: {r.stderr.strip()[-200:]}"


def _compile_job(variants, i: int, arch: int, want_ptxas_info: bool) -> tuple[bool, str]:
    """Compile variants[i] for sm_<arch>; returns (ok, report lines)."""
    fn, sig, const, label, opts = variants[i]
    t0 = time.perf_counter()
    try:
        k = compile_one(fn, sig, const, opts, arch)
    except Exception as e:  # noqa: BLE001 -- report every variant, then fail
        msg = str(e).strip()
        return False, (f"FAIL sm_{arch} {time.perf_counter() - t0:6.2f}s  {label}: {type(e).__name__}: "
                       f"{msg.splitlines()[-1] if msg else ''}\n" + traceback.format_exc(limit=3))
    md = k.metadata
    stages = "+".join(s for s in ("ptx", "cubin") if s in k.asm)
    text = (f"ok   sm_{arch} {time.perf_counter() - t0:6.2f}s  {label}  "
            f"[warps={md.num_warps} smem={md.shared}B {stages}]")
    if "cubin" not in k.asm:
        text += f"\n     note: no cubin for {label} (ptxas missing?)"
    if want_ptxas_info and "ptx" in k.asm:
        text += f"\n     {ptxas_info(k.asm['ptx'], arch)}"
    return True, text


_WORKER_VARIANTS: list = []


def _worker_init(full: bool, only: str) -> None:
    variants, _ = collect(full=full)
    _WORKER_VARIANTS[:] = [v for v in variants if only in v[3]]


def _worker_job(job: tuple[int, int], want_ptxas_info: bool) -> tuple[bool, str]:
    return _compile_job(_WORKER_VARIANTS, job[0], job[1], want_ptxas_info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--only", default="", help="compile only variants whose label contains this")
    ap.add_argument("--full", action="store_true", help="also compile each module's COMPILE_VARIANTS_EXTRA")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="compile in this many worker processes (default min(4, CPUs))")
    ap.add_argument("--fresh", action="store_true", help="compile into an empty cache (no cache hits)")
    ap.add_argument("--ptxas-info", action="store_true",
                    help="re-run ptxas -v on each PTX and print registers / spills per thread")
    args = ap.parse_args(argv)

    if _interpret_set():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "uwrt.kernels.compile_check", *(argv if argv is not None else sys.argv[1:])]
        print("TRITON_INTERPRET is set: re-running without it", flush=True)
        return subprocess.call(cmd, env=env)
    if args.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="uwrt-triton-cache-")

    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    variants, notes = collect(full=args.full)
    for note in notes:
        print(note)
    variants = [v for v in variants if args.only in v[3]]
    if not variants:
        print("FAIL: no kernel variants found")
        return 1
    failures = 0
    t_all = time.perf_counter()
    jobs = [(i, arch) for i in range(len(variants)) for arch in archs]
    n_procs = max(1, min(args.jobs, len(jobs)))
    results: Iterator[tuple[bool, str]]
    if n_procs == 1:
        results = (_compile_job(variants, i, arch, args.ptxas_info) for i, arch in jobs)
    else:
        # spawn (not fork): torch/triton may hold threads; each worker imports the modules itself
        pool = concurrent.futures.ProcessPoolExecutor(
            n_procs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(args.full, args.only))
        results = pool.map(_worker_job, jobs, [args.ptxas_info] * len(jobs))
    for ok, text in results:
        failures += not ok
        print(text, flush=True)
    n = len(variants) * len(archs)
    print(f"{n - failures}/{n} compiled in {time.perf_counter() - t_all:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
