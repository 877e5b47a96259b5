#!/usr/bin/env bash
# The CPU figures in RESULTS.md: the default comparison, the drive probe and the sweep.
#   bash benchmarks/cpu.sh     # outputs under $OUT (if set) or ./cpu-bench
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/cpu-bench}"
mkdir -p "$OUT_DIR"
( time python -m ssdoffload bench -o "$OUT_DIR/default" --no-progress ) 2>&1 | tee "$OUT_DIR/default.txt"
python -m ssdoffload probe "${SPILL:-/tmp/ssdoffload-probe}" --size 1G | tee "$OUT_DIR/probe.txt"
python -m ssdoffload bench --sweep-micro-batch --steps 2 --warmup 1 --sweep-max-micro-batch 16 \
    -o "$OUT_DIR/sweep" --no-progress | tee "$OUT_DIR/sweep.txt"
