#!/usr/bin/env bash
# GPU benchmark runs, meant for one call on a CUDA host (one large GPU, a local disk), ~10 min.
#
#   bash benchmarks/gpu.sh            # outputs under $OUT (if set) or ./gpu-bench
#
# Expects torch with CUDA (2.11+), matplotlib and tqdm; builds ssdoffload's native engine
# in place if it is missing. Each bench run is time-limited so the whole script stays within
# ~10 minutes; a run that hits its limit leaves a note in summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu-bench}"
SPILL="${SPILL:-/tmp/ssdoffload-gpu-spill}"   # a directory on the local disk (not tmpfs)
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
log() { echo "$@" | tee -a "$SUMMARY"; }

if ! python3 -c "import ssdoffload.io._native" 2>/dev/null; then
  log "building the native engine"
  python3 setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1 || pip install -e . >>"$OUT_DIR/build.log" 2>&1
fi
python3 - <<'PY' | tee -a "$SUMMARY"
import torch, os
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
print("cpus", os.cpu_count())
PY
mkdir -p "$SPILL"
df -hT "$SPILL" | tee -a "$SUMMARY"

run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  log "== $name: python3 -m ssdoffload $*"
  local t0=$SECONDS
  timeout --kill-after=20 "$limit" python3 -m ssdoffload "$@" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.err"
  local rc=$?
  log "   rc=$rc in $((SECONDS - t0)) s (124: hit the ${limit} s limit; 3: losses differ)"
  grep -v '^\s*$' "$OUT_DIR/$name.txt" | tail -25 | tee -a "$SUMMARY"
  tail -3 "$OUT_DIR/$name.err" >>"$SUMMARY"
}

# 1. the drive, and what gpu-1b at micro-batch 4 asks of it
run probe 60 probe "$SPILL/probe" --size 1G --preset gpu-1b
# 2. SSDTrain-style wide model: the case where a drive has the best chance to hide full offload
run gpu-wide 220 bench --preset gpu-wide --steps 3 --warmup 1 --spill-path "$SPILL/wide" -o "$OUT_DIR/gpu-wide" --no-progress
# 3. ~1.1B GPT, seq 2048
run gpu-1b 250 bench --preset gpu-1b --steps 3 --warmup 1 --spill-path "$SPILL/1b" -o "$OUT_DIR/gpu-1b" --no-progress
# 4. are CUDA kernels the reason if losses differ? a small deterministic run
run determinism 60 bench --preset gpu-350m --layers 4 --steps 2 --warmup 1 --strategies keep,recompute,ssd \
    --deterministic --no-plots --spill-path "$SPILL/det" -o "$OUT_DIR/determinism" --no-progress
# 5. budget mode's frontier (issue 14): gpu-1b, and the long-context preset
run frontier-1b 240 bench --preset gpu-1b --budgets 1,0.6,0.4,0.25 --spill-path "$SPILL/f1b" \
    -o "$OUT_DIR/frontier-1b" --no-progress
run frontier-long 240 bench --preset gpu-long --budgets 1,0.5,0.25,0.15 --spill-path "$SPILL/flong" \
    -o "$OUT_DIR/frontier-long" --no-progress
# optional: the micro-batch sweep (SWEEP=1), on the 350M preset
if [ "${SWEEP:-0}" = 1 ]; then
  run sweep 240 bench --preset gpu-350m --steps 2 --warmup 1 --sweep-micro-batch --sweep-max-micro-batch 32 \
      --spill-path "$SPILL/sweep" -o "$OUT_DIR/sweep" --no-progress
fi
rm -rf "$SPILL"
log "outputs in $OUT_DIR"
