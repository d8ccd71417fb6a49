"""Probe: does Triton's CPU interpreter (TRITON_INTERPRET=1) give correct results with the
installed numpy?

Run with the venv under test, from the repo root:

    python scripts/check_triton_interpreter.py            # exit 0 = every case passed
    python scripts/check_triton_interpreter.py --verbose  # full tracebacks on failure

Each case is a small kernel of the kind the encoder uses (runtime loop bounds, tl.cdiv loops,
masked loads/stores, tl.dot on 16x16 fp32/fp16 tiles, exp2/max/sum reductions, int64
program-id arithmetic), run in the interpreter on random non-zero CPU tensors and compared
with a torch reference. Prints one PASS/FAIL line per case and the numpy/triton/torch
versions; numpy DeprecationWarnings raised inside a case are printed as WARN lines (on numpy
2.3 they flag what numpy 2.4 turns into errors). Exits 1 if any case fails.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit is applied

import argparse  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _sum_range_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):  # runtime upper bound
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _sum_lo_hi_kernel(x_ptr, out_ptr, lo, hi, step, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, step):  # runtime start, stop and step
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=(offs < hi) & (offs < start + step), other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _row_sum_cdiv_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, tl.cdiv(n_cols, BLOCK)):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride_row + offs, mask=offs < n_cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _while_count_kernel(out_ptr, n, BLOCK: tl.constexpr):
    i = 0
    count = 0
    while i < n:  # runtime-bounded while loop
        count += 1
        i += BLOCK
    tl.store(out_ptr, count)


@triton.jit
def _ragged_row_sum_kernel(x_ptr, len_ptr, out_ptr, tiles_ptr, stride_row, max_len,
                           BLOCK: tl.constexpr):
    # Per-row length read from memory (like a per-request history length), clamped to a
    # runtime maximum: a data-dependent loop bound, a tensor rather than a Python int.
    row = tl.program_id(0)
    n = tl.minimum(tl.load(len_ptr + row), max_len)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride_row + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))
    tiles = 0
    for _ in range(0, tl.cdiv(n, BLOCK)):  # cdiv of a loaded value as the bound
        tiles += 1
    i = 0
    while i < n:  # while on a loaded value
        tiles += 1000
        i += BLOCK
    tl.store(tiles_ptr + row, tiles)


@triton.jit
def _masked_axpy_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=-1.0)
    y = tl.load(y_ptr + offs, mask=mask, other=-1.0)
    tl.store(out_ptr + offs, a * x + y, mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, out_dtype=tl.float32))


@triton.jit
def _matmul_kloop_kernel(a_ptr, b_ptr, c_ptr, k_total, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr):
    rm, rn = tl.arange(0, BM), tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, k_total, BK):  # tl.dot inside a runtime-bounded loop
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * k_total + rk[None, :], mask=rk[None, :] < k_total,
                    other=0.0)
        b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :], mask=rk[:, None] < k_total,
                    other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _softmax_exp2_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_row + offs, mask=mask, other=-float("inf"))
    z = (x - tl.max(x, axis=0)) * 1.4426950408889634  # log2(e)
    num = tl.exp2(z)
    tl.store(out_ptr + row * stride_row + offs, num / tl.sum(num, axis=0), mask=mask)


@triton.jit
def _pid_int64_kernel(out_ptr, big_stride):
    pid0 = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    slot = pid1 * tl.num_programs(0) + pid0
    tl.store(out_ptr + slot, pid0 * big_stride + pid1 * 7 + 3)  # exceeds int32 range


def _randn(*shape, dtype=torch.float32):
    """Random, strictly non-zero values (no accidental pass on all-zero outputs)."""
    x = torch.randn(*shape, dtype=torch.float32)
    return (x + torch.sign(x) * 0.1 + (x == 0) * 0.5).to(dtype)


def case_range_runtime_bound():
    for n in (1, 64, 1000, 4099):
        x = _randn(n)
        out = torch.zeros(1)
        _sum_range_kernel[(1,)](x, out, n, BLOCK=64)
        torch.testing.assert_close(out[0], x.sum(), rtol=1e-4, atol=1e-4)


def case_range_bound_loaded_from_memory():
    lens = torch.tensor([0, 1, 63, 64, 65, 200, 300], dtype=torch.int32)
    x = _randn(len(lens), 256)
    out, tiles = torch.zeros(len(lens)), torch.zeros(len(lens), dtype=torch.int32)
    _ragged_row_sum_kernel[(len(lens),)](x, lens, out, tiles, x.stride(0), 256, BLOCK=64)
    want = torch.stack([x[i, :min(int(n), 256)].sum() for i, n in enumerate(lens)])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    want_tiles = [1001 * triton.cdiv(min(int(n), 256), 64) for n in lens]
    assert tiles.tolist() == want_tiles, (tiles.tolist(), want_tiles)


def case_range_bound_numpy_scalar_arg():
    """A numpy integer (not a Python int) as a scalar kernel argument. Triton rejects these
    in the interpreter whatever the numpy version; callers must pass int(n). The case passes
    when numpy scalars are either rejected with that error or handled correctly."""
    for n in (np.int64(1000), np.int32(257)):  # bound taken from a numpy computation
        x = _randn(int(n))
        out = torch.zeros(1)
        try:
            _sum_range_kernel[(1,)](x, out, n, BLOCK=64)
        except Exception as e:  # noqa: BLE001
            if "cannot convert" not in str(e):
                raise
            _sum_range_kernel[(1,)](x, out, int(n), BLOCK=64)
            NOTES.append(f"numpy {type(n).__name__} scalar arg rejected ({str(e).strip()[:90]}); "
                         f"int(n) works")
        torch.testing.assert_close(out[0], x.sum(), rtol=1e-4, atol=1e-4)


def case_range_runtime_start_step():
    x = _randn(1000)
    for lo, hi, step in ((0, 1000, 64), (100, 900, 32), (7, 1000, 50)):
        out = torch.zeros(1)
        _sum_lo_hi_kernel[(1,)](x, out, lo, hi, step, BLOCK=64)
        torch.testing.assert_close(out[0], x[lo:hi].sum(), rtol=1e-4, atol=1e-4)


def case_cdiv_loop():
    x = _randn(5, 300)
    out = torch.zeros(5)
    _row_sum_cdiv_kernel[(5,)](x, out, 300, x.stride(0), BLOCK=128)
    torch.testing.assert_close(out, x.sum(dim=1), rtol=1e-4, atol=1e-4)


def case_while_runtime_bound():
    for n, block in ((1000, 64), (64, 64), (1, 8)):
        out = torch.zeros(1, dtype=torch.int32)
        _while_count_kernel[(1,)](out, n, BLOCK=block)
        assert int(out[0]) == triton.cdiv(n, block), (int(out[0]), triton.cdiv(n, block))


def case_masked_load_store():
    n = 1000
    x, y = _randn(n), _randn(n)
    out = torch.full((1024,), 12345.0)  # the tail must stay untouched
    _masked_axpy_kernel[(triton.cdiv(n, 128),)](x, y, out, 2.5, n, BLOCK=128)
    torch.testing.assert_close(out[:n], 2.5 * x + y)
    assert torch.all(out[n:] == 12345.0), "masked store wrote past n"


def _dot_case(dtype):
    a, b = _randn(16, 16, dtype=dtype), _randn(16, 16, dtype=dtype)
    c = torch.zeros(16, 16)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-3, atol=1e-3)


def case_dot_fp32_16x16():
    _dot_case(torch.float32)


def case_dot_fp16_16x16():
    _dot_case(torch.float16)


def case_dot_in_runtime_k_loop():
    k = 40  # not a multiple of BK: the last tile is masked
    a, b = _randn(16, k), _randn(k, 16)
    c = torch.zeros(16, 16)
    _matmul_kloop_kernel[(1,)](a, b, c, k, BM=16, BN=16, BK=16)
    torch.testing.assert_close(c, a @ b, rtol=1e-3, atol=1e-3)


def case_softmax_exp2_max_sum():
    x = _randn(6, 100) * 4
    out = torch.zeros_like(x)
    _softmax_exp2_kernel[(6,)](x, out, 100, x.stride(0), BLOCK=128)
    torch.testing.assert_close(out, torch.softmax(x, dim=1), rtol=1e-5, atol=1e-6)


def case_program_id_int64():
    big = 3_000_000_000
    g0, g1 = 4, 3
    out = torch.zeros(g0 * g1, dtype=torch.int64)
    _pid_int64_kernel[(g0, g1)](out, big)
    want = torch.tensor([p0 * big + p1 * 7 + 3 for p1 in range(g1) for p0 in range(g0)])
    assert torch.equal(out, want), (out.tolist(), want.tolist())


NOTES: list = []  # informational findings that are not failures
CASES = [(name[5:], fn) for name, fn in globals().items() if name.startswith("case_")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="print full tracebacks")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"numpy {np.__version__}  triton {triton.__version__}  torch {torch.__version__}  "
          f"python {sys.version.split()[0]}  TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    failed = 0
    for name, fn in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            try:
                fn()
                status, detail = "PASS", ""
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failed += 1
                status, detail = "FAIL", f"  {type(e).__name__}: {str(e).strip()[:400]}"
                if args.verbose:
                    detail += "\n" + traceback.format_exc()
        print(f"{status}  {name}{detail}")
        for note in dict.fromkeys(NOTES):
            print(f"      NOTE {note}")
        NOTES.clear()
        for w in {(str(w.message), w.filename, w.lineno) for w in caught
                  if issubclass(w.category, DeprecationWarning)}:
            print(f"      WARN DeprecationWarning at {w[1]}:{w[2]}: {w[0][:200]}")
    print(f"{len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
