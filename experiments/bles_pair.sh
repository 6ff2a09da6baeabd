#!/usr/bin/env bash
# One MoE-vs-BlES data point: train a model config with and without the BlES loss at the reproduction's budget
# (300 steps x 8 x 128 tokens, 1 thread), then print held-out ExRep / ΔUni of both (docs/results/bles-coefficient.md).
#   experiments/bles_pair.sh CONFIG OUT [BLES_COEF] [BLES_TAU]     e.g. experiments/bles_pair.sh tiny-moe runs/pair
set -euo pipefail
config=$1; out=$2; coef=${3:-5}; tau=${4:-10}
export OMP_NUM_THREADS=1
for arm in moe bles; do
  c=0; [ "$arm" = bles ] && c=$coef
  cosmoes train --preset "$config" --steps 300 --batch-size 8 --seq-len 128 --warmup-steps 15 --eval-every 100 \
    --save-every 300 --bles-coef "$c" --bles-temperature "$tau" --out "$out/$arm" &
done
wait
cosmoes routing "$out/moe" "$out/bles" --out "$out/routing"
