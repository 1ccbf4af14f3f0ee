#!/usr/bin/env bash
# The GPU preset, most important runs first: the shared stages, then DPO beta 0.1, PPO and PPO-GT at
# target KL 6 (never run at scale), then the rest of Figure 2. Each call skips the runs already done.
# usage: bash .ci/gpu/experiment.sh OUT [extra train.py flags, e.g. --preset smoke]
set -u
OUT_DIR=$1; shift
run() { echo "=== $(date +%T) python train.py $*"; python train.py --out "$OUT_DIR" "$@" || echo "=== exit code $?"; }
run --methods sft_point,dpo,ppo,ppo_gt --betas 0.1 --ppo-target-kls 6 "$@"
run --stage methods --methods best_of_n,preferred_ft "$@"
run --stage methods --methods dpo "$@"
run --stage methods --methods ppo_gt,ppo --ppo-target-kls 3,12 "$@"
run --stage methods --methods unlikelihood "$@"
run --stage methods --methods ppo_gt,ppo "$@"
run "$@"
echo "=== $(date +%T) experiment finished"
