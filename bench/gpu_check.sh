#!/usr/bin/env bash
# One GPU check for a session with a lent NVIDIA GPU (H100/H200), inside ~8 minutes:
#
#   OUT=./gpu_out bash bench/gpu_check.sh        (run from the repository root)
#
# Steps, each with its own timeout, continuing on failure, all output under $OUT (at most 8 files):
#   env.txt              nvidia-smi, python/torch/triton/CUDA versions, missing packages
#   tests.log            compiled-kernel tests: TRITON_INTERPRET=0 pytest tests/test_kernels_*.py
#                        tests/test_encoder_triton.py (GPU-only tests run here)
#   sanitizer.log        compute-sanitizer memcheck on small attention/attn_block/layer/encoder runs
#   bench.log            bench/attention_bench.py and bench/encoder_bench.py --device cuda output
#   attention_bench.json, encoder_bench.json
#   serve.log            `uwrt serve --profile gpu --port 0` + `uwrt decide --n 20` smoke
#   summary.txt          one line per step: ok / FAIL / skip, seconds
#
# The device machine has no network: nothing is installed from the internet. Its python3 has
# torch + triton (+ pytest, hypothesis, numpy, grpcio, protobuf). Packages it lacks (xgboost for
# the tree stage, safetensors, ...) can be carried as wheels in ./.whl (see
# /work/.library/device/README.md); this script installs them from there with --no-index if
# present (into /tmp/uwrt_site), else the steps that need them fail and say so.
# Without a usable GPU/torch it prints why and exits 0 after writing summary.txt
# (GPU_CHECK_DRY_RUN=1 runs the steps anyway, to test this script's plumbing on a CPU machine).
set -u
OUT=${OUT:-./gpu_out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
STEPS=",${GPU_CHECK_STEPS:-tests,sanitizer,bench,serve},"     # a subset reruns only those steps
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME TIMEOUT_S LOGFILE CMD...: runs CMD with min(TIMEOUT_S, budget left), appends to LOGFILE.
step() {
    local name=$1 limit=$2 log=$3; shift 3
    local rem; rem=$(left)
    if (( rem < 15 )); then note "skip  $name: time budget spent"; return 0; fi
    (( limit > rem )) && limit=$rem
    echo "=== $name (timeout ${limit}s): $*" >> "$log"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then note "ok    $name (${dt}s)"
    elif (( rc == 124 || rc == 137 )); then note "FAIL  $name: timed out after ${dt}s (see $(basename "$log"))"
    else note "FAIL  $name: exit $rc after ${dt}s (see $(basename "$log"))"; fi
    return 0
}

# ---------------------------------------------------------------------------------------------
ENV="$OUT/env.txt"
{ echo "date: $(date -u)"; echo "host: $(uname -a)"; echo "git: $(git rev-parse --short HEAD 2>/dev/null)"; } > "$ENV"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi >> "$ENV" 2>&1 || echo "nvidia-smi failed" >> "$ENV"
else
    echo "nvidia-smi: not found" >> "$ENV"
fi

if ! command -v "$PY" >/dev/null 2>&1 || ! timeout 60 "$PY" -c "import torch" >> "$ENV" 2>&1; then
    note "skip  all: '$PY -c \"import torch\"' failed: no PyTorch here. On the lent GPU machine the plain python3 has"
    note "      torch+triton; elsewhere set PYTHON=/path/to/python with a CUDA torch (or carry a venv)."
    exit 0
fi
if ! timeout 60 "$PY" - >> "$ENV" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
ok = torch.cuda.is_available()
print("cuda available:", ok)
if ok:
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e); sys.exit(1)
sys.exit(0 if ok else 1)
EOF
then
  if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    note "dry   CUDA not usable; GPU_CHECK_DRY_RUN=1: running the steps anyway (they fail: plumbing test)"
  else
    note "skip  all: CUDA is not usable here (torch.cuda.is_available() is False, or triton is missing); see env.txt"
    exit 0
  fi
fi

# Packages the device image may lack: install carried wheels (offline) if there are any.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/uwrt_site .whl/*.whl >> "$ENV" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:/tmp/uwrt_site"
        echo "installed carried wheels: $(ls .whl | tr '\n' ' ')" >> "$ENV"
    else
        echo "carried wheels did not install (see above)" >> "$ENV"
    fi
fi
"$PY" - >> "$ENV" 2>&1 <<'EOF'
import importlib
for m in ("numpy", "pytest", "hypothesis", "grpc", "google.protobuf", "safetensors", "xgboost", "treelite", "tl2cgen", "onnxruntime"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:16s} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m:16s} MISSING ({type(e).__name__}: {e})")
EOF
note "env   $(grep -m1 '^device:' "$ENV" || echo 'device: ?')"

# ---------------------------------------------------------------------------------------------
# 1. Compiled-kernel tests (GPU-only tests included). The kernel-level files need no bundle; the
#    encoder file's generator test needs xgboost (small_bundle fixture) and is reported as such.
export TRITON_INTERPRET=0
want() { case "$STEPS" in *",$1,"*) return 0;; *) note "skip  $1: not in GPU_CHECK_STEPS"; return 1;; esac; }
if want tests; then
TESTS=$(ls tests/test_kernels_*.py tests/test_encoder_triton.py 2>/dev/null | grep -v test_kernels_compile.py | tr '\n' ' ')
step "pytest (compiled kernels): $TESTS" 200 "$OUT/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS
fi

# 2. compute-sanitizer memcheck on small runs of every kernel.
if want sanitizer; then
SAN="$OUT/sanitizer.log"
cat > /tmp/uwrt_sanitize.py <<'EOF'
import numpy as np, torch
from kernels import dispatch as K
from runtime.encoder import SequenceEncoder
from runtime.encoder_triton import TritonEncoderBackend
from runtime.featurize import PackedEvents
from runtime.schema import EncoderConfig
torch.manual_seed(0)
cfg = EncoderConfig()
rng = np.random.default_rng(0)
lens = np.array([1, 7, 16, 17, 33, 128])
cu = np.zeros(len(lens) + 1, np.int32); cu[1:] = np.cumsum(lens)
T = int(cu[-1])
ev = PackedEvents(rng.integers(1, cfg.n_event_types, T), rng.integers(0, cfg.mcc_buckets, T),
                  rng.normal(size=(T, cfg.n_numeric)).astype(np.float32), cu, int(lens.max()))
for dt in (torch.float16, torch.float32):
    be = TritonEncoderBackend(cfg, SequenceEncoder(cfg).state_dict(), device="cuda", dtype=dt, cuda_graphs=False,
                              impl="triton")
    out = be.encode(ev)
    assert np.isfinite(out).all()
    qkv = torch.randn(T + 5, 3 * cfg.d_model, device="cuda", dtype=dt)
    a = K.attention(qkv, torch.from_numpy(cu).cuda(), cu, n_heads=cfg.n_heads, head_dim=cfg.head_dim,
                    max_seqlen=int(lens.max()), impl="triton")
    torch.cuda.synchronize()
print("sanitizer workload done")
EOF
if command -v compute-sanitizer >/dev/null 2>&1; then
    step "compute-sanitizer memcheck" 120 "$SAN" \
        compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" /tmp/uwrt_sanitize.py
else
    note "skip  compute-sanitizer: not on PATH"
    step "sanitizer workload without compute-sanitizer" 60 "$SAN" "$PY" /tmp/uwrt_sanitize.py
fi
fi

# 3. Timings: attention kernel (if its bench exists) and the whole encoder, graphs on and off.
BENCH="$OUT/bench.log"
if want bench; then
if [ -f bench/attention_bench.py ]; then
    step "bench/attention_bench.py --device cuda" 60 "$BENCH" \
        "$PY" bench/attention_bench.py --device cuda --json "$OUT/attention_bench.json"
else
    note "skip  attention bench: bench/attention_bench.py not found"
fi
step "bench/encoder_bench.py --device cuda" 150 "$BENCH" \
    "$PY" bench/encoder_bench.py --device cuda --json "$OUT/encoder_bench.json"
fi

# 4. End-to-end smoke: the gpu profile's server and a few requests.
SERVE="$OUT/serve.log"
if ! want serve; then :
elif "$PY" -m runtime.cli serve --help 2>/dev/null | grep -q -- "--profile"; then
    rem=$(left)
    if (( rem > 40 )); then
        "$PY" -m runtime.cli serve --profile gpu --port 0 > "$OUT/.serve.out" 2>> "$SERVE" &
        SPID=$!
        port=""
        for _ in $(seq 1 $(( rem > 120 ? 90 : rem - 30 ))); do
            port=$(grep -o 'serving on [^ ]*:[0-9]*' "$OUT/.serve.out" 2>/dev/null | grep -o '[0-9]*$' | head -1)
            [ -n "$port" ] && break
            kill -0 "$SPID" 2>/dev/null || break
            sleep 1
        done
        cat "$OUT/.serve.out" >> "$SERVE"
        if [ -n "$port" ]; then
            step "uwrt decide --n 20 against serve --profile gpu (port $port)" 40 "$SERVE" \
                "$PY" -m runtime.cli decide --target "127.0.0.1:$port" --n 20
        else
            note "FAIL  serve --profile gpu did not report its port (see serve.log)"
        fi
        kill -TERM "$SPID" 2>/dev/null
        for _ in $(seq 1 15); do kill -0 "$SPID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SPID" 2>/dev/null
        wait "$SPID" 2>/dev/null
        cat "$OUT/.serve.out" >> "$SERVE" 2>/dev/null
        rm -f "$OUT/.serve.out"
    else
        note "skip  serve smoke: time budget spent"
    fi
else
    note "skip  serve smoke: 'uwrt serve --profile' does not exist in this tree"
fi

note "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit 0
