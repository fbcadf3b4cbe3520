#!/usr/bin/env bash
# Score the ladder's rungs (and the shipped model, step 0) among the world's concepts with the
# world evaluator: 128 prompts (each world-128 concept once) x 2 seeds, DDIM 25, guidance 7.5.
# Run from the folder holding data/ and runs/ (here /work):
#   bash main/benchmarks/world_ladder_eval.sh EVALUATOR_DIR [SIZES...]
set -euo pipefail
evaluator=$1; shift
sizes=${*:-32 64 128}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
here=$(cd "$(dirname "$0")/.." && pwd)
score() {  # name pretrained
    python "$here/benchmarks/minisd_quality.py" --pretrained "$2" --evaluator "$evaluator" \
        --world data/world128.json --among data/world32.json data/world64.json --prompts 128 --seeds 2 \
        --threads 1 --work "runs/ladder/q_$1" --out "runs/ladder/q_$1.json" --grid "runs/ladder/q_$1.png" \
        > "runs/ladder/q_$1.log" 2>&1
}
for n in $sizes; do
    datencoder minisd export "$here/configs/minisd_unet_world.yaml" train.work_dir=runs/ladder/w$n \
        export_dir=runs/ladder/w$n/export grid.num_prompts=0 > runs/ladder/export_w$n.log 2>&1
done
# two at a time, one thread each
score v1 minisd-emoji &
for n in $sizes; do
    score "w$n" "runs/ladder/w$n/export" &
    [ "$(jobs -r | wc -l)" -ge 2 ] && wait -n
done
wait
