#!/usr/bin/env bash
# Two GPUs of one host (the device's nvidia-h200-x2), two run lists at once: RUNS0 on GPU 0 and RUNS1 on GPU 1,
# each through bench/run_gpu.sh with its own results folder ($OUT/g0, $OUT/g1) and the same settings (COOL, SMI,
# STEPS, LONG, ...). Each list is its own comparison on its own card (e.g. Unsloth and medtune in ABBA order on
# one, BAAB on the other); nothing is compared across the two cards. The set-up (wheels, the random model, the
# token ids, Unsloth's wheels when carried) runs once, before both.
set -u
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
RUNS=none OUT="$OUT/setup" bash bench/run_gpu.sh || exit 1
if [ -d .whl2 ] && [ ! -f /tmp/site2/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl2/*.whl \
    && touch /tmp/site2/.done || exit 1
fi
for g in 0 1; do
  eval "runs=\${RUNS$g:-}"
  [ -n "$runs" ] || continue
  eval "cool=\${COOL$g:-\${COOL:-}}"  # COOL0 / COOL1: that list's idle seconds before each run (else COOL)
  CUDA_VISIBLE_DEVICES=$g RUN_TMP=/tmp/g$g OUT="$OUT/g$g" RUNS="$runs" COOL="$cool" bash bench/run_gpu.sh > "$OUT/g$g.log" 2>&1 &
done
wait
tail -n 40 "$OUT"/g*.log
