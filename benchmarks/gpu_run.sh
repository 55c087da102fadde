#!/usr/bin/env bash
# FastFace speed benchmark on one CUDA GPU, offline: the full-size SDXL architecture with random
# weights (nothing to download), 1024x1024, every variant including the 30-step baseline, the
# host-device sync check, the AM overhead per kernel, the VAE options, the channels-last / compile
# gains, and the engine's CUDA tests.
# Writes JSON, markdown and logs into $OUT (6 files). About 6-7 minutes on an H100/H200 (runs 1
# and 2 took 2 minutes on an H200; run 3 is mostly torch.compile).
#
#   python3 -m pip install -q --no-deps --no-index --target /tmp/pydeps diffusers-0.42.1-py3-none-any.whl
#   OUT=/tmp/out PYTHONPATH=/tmp/pydeps bash benchmarks/gpu_run.sh
#
# Needs torch, diffusers, transformers, peft, accelerate, safetensors, tqdm (PYTHONPATH may point
# at an unpacked diffusers wheel; src/ is added here).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export FASTFACE_CACHE="${FASTFACE_CACHE:-/tmp/fastface-cache}"
OUT="${OUT:-benchmarks/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
log() { echo "[gpu_run $(date +%H:%M:%S)] $*"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/environment.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/environment.txt"
import torch, diffusers, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
PYEOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: stop"; exit 1
fi
status=0

# 1. The table: every variant, bf16, 5 repeats; AM paired overhead per kernel; sync check; VAE
#    options; the channels-last gain.
log "run 1: all variants, 1024x1024, 4 steps, bf16"
timeout 240 "$PY" benchmarks/speed.py --backbone fullsize --like hyper-4 --resolution 1024 --steps 4 \
    --device cuda --dtype bf16 --repeats 5 --warmup 1 --no-progress \
    --variants none,dcg,am,fastface,fastface-guided,fastface-softmask,naive,fastface-unfused,sdxl \
    --am-pairs 20 --sync-check --vae-compare --compare-options channels-last \
    --json "$OUT/speed_1024_bf16.json" --markdown "$OUT/speed_1024_bf16.md" || { status=1; log "run 1 failed or timed out"; }

# 2. The engine's own GPU checks (tiny models): no host-device sync inside the loop, fp16 images.
log "run 2: tests/test_pipeline_cuda.py"
timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_pipeline_cuda.py 2>&1 | tail -15 | tee "$OUT/pipeline_cuda_tests.txt" \
    || { status=1; log "run 2 failed or timed out"; }

# 3. torch.compile: dcg and fastface eager, then both compiled (the AM overhead under compile).
#    Eager, the UNet at 4 steps is launch-bound on an H100/H200 (its time hardly depends on the
#    batch), so AM's extra small operations show; compiled, they are fused. Compiling the SDXL
#    UNet for two batch sizes takes minutes: last, under its own timeout; the report is saved
#    before and after each compiled variant, so a timeout loses only what was still compiling.
log "run 3: torch.compile of dcg and fastface"
timeout 270 "$PY" benchmarks/speed.py --backbone fullsize --like hyper-4 --resolution 1024 --steps 4 \
    --device cuda --dtype bf16 --repeats 3 --warmup 1 --no-progress --variants dcg,fastface \
    --compare-options compile \
    --json "$OUT/speed_1024_bf16_compile.json" --markdown "$OUT/speed_1024_bf16_compile.md" || { status=1; log "run 3 failed or timed out"; }

log "done (status $status); files in $OUT:"
ls -l "$OUT"
exit $status
