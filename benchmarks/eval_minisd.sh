#!/bin/bash
# The full comparison of reports/results_v1.md on the embedded default minisd-emoji, as it was run on a
# 2-core CPU: single-thread processes side by side (on two cores that beats one two-thread process
# for these small batches). Every step is resumable: rerun this script after an interruption.
#
#   bash benchmarks/eval_minisd.sh            # needs the emoji data set (datencoder data emoji)
#
# Pre-training: the main encoder (shipped as src/datencoder/assets/minisd-emoji-encoder) and the
# three encoders the ablations and the E4T-style baseline need, 2,400 steps each.
# Evaluation: one process per method family; baselines' step series continue one optimisation.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
runs=${RUNS:-/work/runs}
logs=$runs/logs
mkdir -p "$logs"

pretrain() {  # NAME
  local out=$runs/pretrain/$1 resume=""
  [ -d "$out/checkpoint" ] && resume="--resume"
  datencoder pretrain "$1" train.steps=2400 train.output_dir="$out" $resume > "$logs/pretrain_$1.log" 2>&1
}
evaluate() {  # METHODS [SHARD K/N]
  datencoder evaluate eval_minisd output_dir="$runs/eval/minisd" --methods "$1" ${2:+--shard $2} \
    > "$logs/eval_${1%%,*}${2:+_${2%/*}}.log" 2>&1
}

pretrain minisd_encoder &
pretrain minisd_encoder_no_contrastive &
pretrain minisd_encoder_no_hypernet &
pretrain minisd_e4t_animals &
wait
pretrain minisd_encoder_full_hypernet   # issue 11: the higher-capacity hypernetwork ablation

# eval_minisd.yaml reads the encoders from /work/runs/pretrain/...; with another RUNS, override
# each method's encoder path or link $RUNS/pretrain to /work/runs/pretrain.
# Textual Inversion is the longest (2,000 steps per target): two processes, half the targets each
evaluate no-personalisation,ti-100,ti-500,ti-2000 0/2 &
evaluate no-personalisation,ti-100,ti-500,ti-2000 1/2 &
evaluate db-lora-50,db-lora-200,db-lora-800 &
evaluate ours-0,ours-4,ours-12,ours-50,no-dual-path-12 &
wait
evaluate no-contrastive-12,no-hypernet-12,e4t-animals-inside,e4t-animals-outside
evaluate ours-12-full-hypernet,ours-12-tune-heads
python benchmarks/eval_reference.py --output-dir "$runs/eval/minisd"   # ceiling rows
# the reports (results.md, scatter.png, grids) cover every method's records
datencoder evaluate eval_minisd output_dir="$runs/eval/minisd" --methods no-personalisation
