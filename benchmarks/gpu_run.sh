#!/usr/bin/env bash
# FastFace speed on one CUDA GPU, offline, in at most ~12.5 minutes of wall time (the lease is 15,
# machine start included; the per-run limits below add up to 725 s):
# the full-size SDXL architecture with random weights (nothing to download), 1024x1024, bf16.
#
#   run A  eager table (none / dcg / fastface / sdxl-30), host set-up per stage (cached vs the
#          old placement reads), AM overhead per kernel (paired UNet calls), host-device syncs in
#          the loop; then the SAME variants compiled with CUDA graphs (mode reduce-overhead) and
#          the measured/floor ratio of each row. The target row is fastface+graphs.
#   run B  the same variants compiled without CUDA graphs (inductor default mode).
#   run C  FP8 linear layers (compiled + graphs) vs bf16 on the same seeds: speed and PSNR.
#   run D  the engine's CUDA tests (tests/test_pipeline_cuda.py), if time is left.
#
# Compilation is paid once: every run shares one inductor/AOT cache directory ($CACHE), so a
# graph compiled in run A is loaded, not rebuilt, by runs B and C where inductor's cache key
# allows it. Each run writes its JSON/markdown after every variant (a timeout keeps what was
# measured) and has its own timeout, in priority order.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh            # on the GPU machine
#   bash benchmarks/gpu_run.sh --smoke                 # dry run of the same steps on CPU, tiny model
#
# Needs torch, diffusers, transformers, peft, accelerate, safetensors, tqdm. Wheels of anything
# missing there (the GPU image has no diffusers) go into .gpu-wheels/ beforehand, here:
#   python -m pip download --no-deps -d .gpu-wheels diffusers==0.42.1
# and travel with the run (carry: [".gpu-wheels"]); they are installed into /tmp/pydeps.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FASTFACE_CACHE="${FASTFACE_CACHE:-/tmp/fastface-cache}"
CACHE="${CACHE:-/tmp/fastface-inductor}"
# One compile cache for every run of this script (FX graphs, AOT autograd, Triton kernels).
export TORCHINDUCTOR_CACHE_DIR="$CACHE" TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TRITON_CACHE_DIR="$CACHE/triton"
OUT="${OUT:-benchmarks/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$CACHE"
log() { echo "[gpu_run $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_run.log"; }
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

WHEELS="${WHEELS:-.gpu-wheels}"
if [[ -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/pydeps "$WHEELS"/*.whl 2>&1 | tail -2
    export PYTHONPATH="/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ $SMOKE == 1 ]]; then
    # The same commands on the CPU: tiny backbone, 64x64, torch.compile with the eager backend
    # (graph capture and recompile counting without code generation); graphs and FP8 need CUDA
    # and must fail with a one-line reason.
    COMMON=(--backbone tiny --device cpu --dtype fp32 --threads 1 --repeats 1 --warmup 1 --no-progress
            --compile-backend eager)
    VARIANTS=none,fastface
    T_A=900; T_B=600; T_C=300; T_D=0
    A_EXTRA=(--host-stages 1 --am-pairs 1)
else
    COMMON=(--backbone fullsize --like hyper-4 --resolution 1024 --steps 4 --device cuda --dtype bf16
            --repeats 3 --warmup 1 --no-progress --am-kernel fused)
    VARIANTS=none,dcg,fastface,sdxl
    T_A=380; T_B=150; T_C=150; T_D=45
    A_EXTRA=(--host-stages 3 --am-pairs 10 --sync-check)
fi

log "environment"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } \
    2>&1 | tee "$OUT/environment.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/environment.txt"
import torch, diffusers, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
PYEOF
if [[ $SMOKE == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: stop (use --smoke for the CPU dry run)"; exit 1
fi
status=0
run() {  # run NAME TIMEOUT ARGS...: one benchmark process, its own timeout, JSON + markdown + log
    local name=$1 limit=$2; shift 2
    log "run $name (limit ${limit}s, ${SECONDS}s into the script)"
    timeout "$limit" "$PY" benchmarks/speed.py "$@" --json "$OUT/$name.json" --markdown "$OUT/$name.md" \
        > "$OUT/$name.log" 2>&1 || { status=1; log "run $name failed or timed out (see $name.log)"; tail -3 "$OUT/$name.log"; }
}

# A. eager, host stages, AM kernels, syncs; then compiled + CUDA graphs (the target).
if [[ $SMOKE == 1 ]]; then A_OPTS=compile; else A_OPTS=graphs; fi
run A_eager_graphs "$T_A" "${COMMON[@]}" --variants "$VARIANTS" "${A_EXTRA[@]}" --compare-options "$A_OPTS"
# B. compiled without CUDA graphs.
run B_compiled "$T_B" "${COMMON[@]}" --variants "$VARIANTS" --compare-options compile
# C. FP8 (compiled + graphs) against bf16 eager on the same seeds (PSNR in the markdown).
if [[ $SMOKE == 1 ]]; then C_OPTS=fp8; else C_OPTS=graphs,fp8; fi
run C_fp8 "$T_C" "${COMMON[@]}" --variants fastface,none --compare-options "$C_OPTS"
# D. the engine's own CUDA checks (tiny models), if the lease still has room.
if [[ $SMOKE == 0 && $(elapsed) -lt 660 ]]; then
    log "run D: tests/test_pipeline_cuda.py"
    timeout "$T_D" "$PY" -m pytest -q -p no:cacheprovider tests/test_pipeline_cuda.py 2>&1 | tail -5 \
        | tee "$OUT/D_pipeline_cuda_tests.txt" || status=1
fi

log "done in $(elapsed) s (status $status); tables:"
for f in "$OUT"/A_eager_graphs.md "$OUT"/B_compiled.md "$OUT"/C_fp8.md; do
    [[ -f "$f" ]] && { echo "== $f"; grep -E "^\| (none|dcg|fastface|sdxl)|measured|Compiled|vs eager|FP8|placement|after|before" "$f"; }
done
exit $status
