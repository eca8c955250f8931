#!/usr/bin/env bash
# The 64x study (issue #15): what it takes for LEGW to hold at k = 64 (batch 8192) against the B0 = 128 baseline of
# `legw-fused train mnist --full` (all 50k images). Every stage is an ordinary resumable sweep: run this script
# again after a kill, or in a later session, and it continues where it stopped (finished sweeps are skipped, an
# interrupted training continues from its last epoch checkpoint). Stages, in the order they answer the question:
#   A  base warmup w0 at B0 (LEGW scales it by k = 64): 1/64 (the current baseline: 6 warmup steps at every k),
#      1/8, 1/4 epoch; SGD at the current baseline LR 0.8; 3 seeds.
#   B  the same with LARS (baseline LR 4), and LARS at baseline LR 1 (w0 = 1/4, one seed).
#   C  the baseline LR re-tuned for the 25-epoch budget at B0 = 128 (SGD; w0 from stage A's best): 0.1 0.2 0.4 0.8.
#   D  the epoch budget at 8192: 50 and 100 epochs, with stage A/B/C's best configuration (set D_ARGS).
# Each sweep trains the baseline (B0 = 128) and B = 8192 under the `legw` scheme, per seed. Results:
# $OUT/<stage-name>/mnist/results.{json,md} and plots (mean ± sd over the seeds); all of them compared in
# $OUT/summary.{md,png} (experiments/study64_summary.py).
# Times on the 2-core CPU (~3 minutes per 25-epoch training at B0 = 128, ~4 at 8192, less when it diverges):
# A ~1.5 h, B ~1 h, C ~1 h (one seed), D ~1.3 h. Usage: bash experiments/study64.sh [A|B|C|D ...] (default: all,
# in order).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/study64}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
# Stage D's default: the best 8192 configuration of stages A and C (w0 = 1/4, baseline LR 0.2: 90.43% at 8192,
# seed 0); set D_ARGS to another if stage B's LARS does better.
D_ARGS=${D_ARGS:---optimizer sgd --base-warmup-epochs 0.25 --base-lr 0.2}

sweep() {  # sweep NAME [legw-fused train options...]
  local name=$1
  shift
  echo "== $name: legw-fused train mnist --full --schemes legw $*"
  # shellcheck disable=SC2086
  "$PY" -m legw_fused train mnist --full --schemes legw --quiet --resume --out "$OUT/$name" "$@"
}

stage_A() {
  for w0 in 0.015625 0.125 0.25; do
    # shellcheck disable=SC2086
    sweep "A-sgd-w0-$w0" --batch-sizes 128 8192 --optimizer sgd --base-warmup-epochs "$w0" --seeds $SEEDS
  done
}

stage_B() {
  # w0 = 1/4 first: stage A's best for SGD, so the LARS-vs-SGD comparison that matters comes first.
  for w0 in 0.25 0.015625 0.125; do
    # shellcheck disable=SC2086
    sweep "B-lars-w0-$w0" --batch-sizes 128 8192 --optimizer lars --base-warmup-epochs "$w0" --seeds $SEEDS
  done
  # LARS with a 4x smaller baseline LR (what made SGD finish at 8192 in stage C), w0 = 1/4, seed 0.
  sweep "B-lars-lr-1" --batch-sizes 128 8192 --optimizer lars --base-lr 1 --base-warmup-epochs 0.25 --seeds 0
}

stage_C() {
  for lr in 0.1 0.2 0.4 0.8; do
    sweep "C-sgd-lr-$lr" --batch-sizes 128 8192 --optimizer sgd --base-lr "$lr" --base-warmup-epochs 0.25 --seeds 0
  done
}

stage_D() {
  for epochs in 50 100; do
    # shellcheck disable=SC2086
    sweep "D-epochs-$epochs" --batch-sizes 8192 --epochs "$epochs" $D_ARGS --seeds $SEEDS
  done
  # The baseline these are compared with: B0 = 128 at 25 epochs with the same configuration, per seed (stage C has
  # seed 0 only).
  # shellcheck disable=SC2086
  sweep "D-baseline-128" --batch-sizes 128 $D_ARGS --seeds $SEEDS
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(A B C D)
for s in "${stages[@]}"; do
  case "$s" in
    A | B | C | D) "stage_$s" ;;
    *) echo "unknown stage $s (A, B, C or D)" >&2 && exit 2 ;;
  esac
done
# Every sweep so far in one table and one plot: $OUT/summary.md, $OUT/summary.png.
"$PY" experiments/study64_summary.py "$OUT"
