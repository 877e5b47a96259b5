#!/usr/bin/env bash
# Every GPU check in one call on a CUDA host (one large GPU, a local disk), at most 8 minutes:
# the CUDA tests, the drive, the hooks' overhead, budget mode's frontier on gpu-1b and on the
# long-context preset. What benchmarks/RESULTS.md needs lands in summary.txt.
#
#   bash benchmarks/gpu.sh            # outputs under $OUT (if set) or ./gpu-bench
#   FULL=1 bash benchmarks/gpu.sh     # also the strategy comparisons (gpu-wide, gpu-1b): +8 min
#
# Expects torch with CUDA (2.11+), pytest, matplotlib and tqdm; builds ssdoffload's native
# engine in place if it is missing. Each step is time-limited (the limits add up to 465 s); a
# step that hits its limit leaves a note in summary.txt.
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

# 1. the CUDA tests (staging, the host-RAM tier's copies, streams)
log "== cuda tests: python3 -m pytest -q -m cuda tests"
t0=$SECONDS
timeout --kill-after=10 90 python3 -m pytest -q -m cuda tests >"$OUT_DIR/cuda-tests.txt" 2>&1
log "   rc=$? in $((SECONDS - t0)) s"; tail -3 "$OUT_DIR/cuda-tests.txt" | tee -a "$SUMMARY"
# 2. the drive: engine against raw O_DIRECT, and what gpu-1b asks of it
run probe 45 probe "$SPILL/probe" --size 1G --preset gpu-1b
# 3. the hooks' cost per saved tensor, and gpu-1b's step with nothing offloaded (target <= 1%)
run overhead 60 bench --overhead --preset gpu-1b --spill-path "$SPILL/ovh" -o "$OUT_DIR/overhead"
# 4. budget mode's frontier (issue 14): gpu-1b (target: >= 5% faster than full recomputation at
#    its memory), and the long-context preset (checkpoint-input offload to the SSD within 2%)
run frontier-1b 150 bench --preset gpu-1b --budgets 1,0.5,0.3 --spill-path "$SPILL/f1b" \
    -o "$OUT_DIR/frontier-1b" --no-progress
run frontier-long 120 bench --preset gpu-long --budgets 1,0.3 --spill-path "$SPILL/flong" \
    -o "$OUT_DIR/frontier-long" --no-progress
# optional: the strategy comparisons and the micro-batch sweep
if [ "${FULL:-0}" = 1 ]; then
  run gpu-wide 220 bench --preset gpu-wide --steps 3 --warmup 1 --spill-path "$SPILL/wide" -o "$OUT_DIR/gpu-wide" --no-progress
  run gpu-1b 250 bench --preset gpu-1b --steps 3 --warmup 1 --spill-path "$SPILL/1b" -o "$OUT_DIR/gpu-1b" --no-progress
fi
if [ "${SWEEP:-0}" = 1 ]; then
  run sweep 240 bench --preset gpu-350m --steps 2 --warmup 1 --sweep-micro-batch --sweep-max-micro-batch 32 \
      --spill-path "$SPILL/sweep" -o "$OUT_DIR/sweep" --no-progress
fi
rm -rf "$SPILL"
log "outputs in $OUT_DIR"
