#!/usr/bin/env bash
# The GPU check and benchmark sweep for a bare one-GPU machine without network, in under 8 minutes.
#
#   bash scripts/gpu_bench.sh --prepare   # HERE, with network: download the wheels the GPU machine lacks
#                                         # (diffusers, open_clip and their missing needs) into wheelhouse/
#   bash scripts/gpu_bench.sh             # THERE (CUDA): install wheelhouse/, pytest -m gpu, latency sweep,
#                                         # throughput hpcwalk vs diffusers; JSON and logs into $OUT
#   bash scripts/gpu_bench.sh --smoke     # anywhere (CPU here): the same steps on the tiny model, in minutes
#
# With the device tool, carry the wheels and name the output folder it returns:
#   run(command="bash scripts/gpu_bench.sh", carry=["wheelhouse"], timeout_s=590)
# wheelhouse/ is in .gitignore; the GPU image already has torch, triton, transformers, accelerate,
# huggingface_hub, safetensors, typer, tqdm, pyarrow, pytest (see /work/.library/device/KINDS.md).
# Without CUDA the script runs in smoke mode by itself. Each step is bounded by the time left, and
# skipped (and said so in summary.json) when too little is left.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WHEELS="$ROOT/wheelhouse"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_BENCH_BUDGET_S:-450}"  # the issue asks for under 8 minutes; each step is cut to what is left
START=$(date +%s)

# --- 0. --prepare: wheels for the GPU image (Python 3.12, x86-64), pinned to what this checkout uses
if [ "${1:-}" = "--prepare" ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
    importlib_metadata==10.2.0 zipp==4.1.2 || exit 1
  du -sh "$WHEELS"; ls "$WHEELS"
  exit 0
fi

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT="${OUT:-$ROOT/gpu_bench_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say() { echo "[gpu_bench $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
STEPS=()
step() {  # step NAME MIN_SECONDS_LEFT CAP_SECONDS CMD...: run CMD under min(time left, cap), record the outcome
  local name="$1" need="$2" cap="$3"; shift 3
  local remain; remain=$(left)
  if [ "$remain" -lt "$need" ]; then
    say "skip $name: ${remain}s left, needs ${need}s"; STEPS+=("\"$name\": \"skipped: ${remain}s left\""); return
  fi
  [ "$remain" -gt "$cap" ] && remain=$cap
  say "start $name (limit ${remain}s): $*"
  timeout "$remain" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "end $name: exit $rc"; STEPS+=("\"$name\": $rc")
}

# --- 1. environment: carried wheels, hpcwalk importable as hpcwalk + hpcwalk.kernels without a build
HAVE_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[ "$HAVE_CUDA" = "1" ] || SMOKE=1
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 && [ "$HAVE_CUDA" = "1" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hpcwalk-site \
    "$WHEELS"/*.whl >> "$LOG" 2>&1 || { say "wheel install failed (see log)"; exit 1; }
  export PYTHONPATH="/tmp/hpcwalk-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# lay the package out by hand (kernels/ as hpcwalk.kernels), first on the path: the same code runs
# here (over an editable install) and there (no install at all)
rm -rf /tmp/hpcwalk-src && mkdir -p /tmp/hpcwalk-src
cp -r hpcwalk /tmp/hpcwalk-src/hpcwalk && cp -r kernels /tmp/hpcwalk-src/hpcwalk/kernels
export PYTHONPATH="/tmp/hpcwalk-src${PYTHONPATH:+:$PYTHONPATH}"
RUN=("$PY" -P)  # -P: the checkout's own hpcwalk/ (without kernels/) must not shadow the laid-out package
"${RUN[@]}" -c 'import torch, triton, transformers, diffusers, open_clip, hpcwalk.kernels, hpcwalk.engine; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' >> "$LOG" 2>&1 \
  || { tail -20 "$LOG"; say "environment check failed: the imports above do not work here (see $LOG)"; exit 1; }
tail -1 "$LOG"
[ "$HAVE_CUDA" = "1" ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1

GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
gpu_tests() { step gpu_tests 60 150 "${RUN[@]}" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS --junitxml="$OUT/gpu_tests.xml"; }

# --- 2. the sweep, most needed first; each step bounded by a cap and by the time left
if [ "$SMOKE" = "1" ]; then
  say "smoke mode (no CUDA or --smoke): tiny model on $("${RUN[@]}" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
  gpu_tests
  step latency 30 300 "${RUN[@]}" benchmarks/step_latency.py --smoke --out "$OUT" --name step-latency-smoke
  step throughput 30 300 "${RUN[@]}" benchmarks/throughput.py --smoke --variant none/scheduler/torch --out "$OUT" --name throughput-smoke
else
  M=(--model sd14-random --height 512 --width 512)
  W=(--dtype float16 --steps 30 --frames 16 --batch 8)
  # end to end, eager, one process: hpcwalk fused step + post-processing, hpcwalk plain, diffusers, Parquet
  step throughput_eager 60 150 "${RUN[@]}" benchmarks/throughput.py "${M[@]}" "${W[@]}" --repeats 2 \
    --step fused --postprocess fused --variant none/scheduler/torch --out "$OUT" --name throughput-sd14-fp16-eager
  # per-step latency, eager: fp16 and bf16, SDPA and cuDNN attention, batch 1 and 8 (UNet, VAE, CLIP, kernels)
  step latency_eager 60 170 "${RUN[@]}" benchmarks/step_latency.py "${M[@]}" --dtypes float16,bfloat16 --attention sdpa,cudnn \
    --compile none --batches 1,8 --warmup 3 --iters 15 --skip-unavailable --out "$OUT" --name step-latency-eager
  gpu_tests
  # end to end, torch.compile default (UNet and VAE), fused step and post-processing, vs diffusers in the same process
  step throughput_compiled 150 260 "${RUN[@]}" benchmarks/throughput.py "${M[@]}" "${W[@]}" --repeats 3 \
    --compile default --step fused --postprocess fused --variant default/scheduler/torch --no-parquet \
    --out "$OUT" --name throughput-sd14-fp16-compiled
  # the same with CUDA graphs, then compiled per-step latency, if time is left
  step throughput_cudagraphs 120 200 "${RUN[@]}" benchmarks/throughput.py "${M[@]}" "${W[@]}" --repeats 3 \
    --compile reduce-overhead --step fused --postprocess fused --no-parquet --out "$OUT" --name throughput-sd14-fp16-cudagraphs
  step latency_compiled 120 200 "${RUN[@]}" benchmarks/step_latency.py "${M[@]}" --dtypes float16 --attention sdpa \
    --compile default --batches 8 --parts unet,vae --warmup 2 --iters 15 --out "$OUT" --name step-latency-compiled
fi

# --- 4. summary: what ran, exit codes, time used
{
  echo "{"
  echo "  \"smoke\": $SMOKE, \"cuda\": $HAVE_CUDA, \"seconds\": $(( $(date +%s) - START )), \"budget_s\": $BUDGET_S,"
  echo "  \"steps\": {$(IFS=,; echo "${STEPS[*]}")}"
  echo "}"
} > "$OUT/summary.json"
say "done: $(cat "$OUT/summary.json" | tr -d '\n ')"
ls -la "$OUT" | tee -a "$LOG"
