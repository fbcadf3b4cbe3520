#!/usr/bin/env bash
# Quality of one base on one world: 3 prompts per concept (default) (the benchmark's recipe of style, size,
# position, background), 2 seeds, DDIM 25, guidance 7.5, scored by the world evaluator among the
# world's concepts; the first 24 prompts form the grid (real composite, then one column per seed).
# Run from the folder holding data/ and runs/ (here /work):
#   bash main/benchmarks/world_quality.sh NAME PRETRAINED WORLD_SIZE [PROMPTS_PER_CONCEPT] [OUT_JSON]
set -euo pipefail
name=$1; pretrained=$2; n=$3; per=${4:-3}; out=${5:-runs/world_quality/$name.json}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p runs/world_quality
python "$here/benchmarks/minisd_quality.py" --pretrained "$pretrained" --evaluator evaluator_world \
    --world "data/world$n.json" --prompts $((per * n)) --seeds 2 --threads 1 --grid-rows 24 \
    --work "runs/world_quality/$name" --out "$out" --grid "runs/world_quality/$name.png" \
    > "runs/world_quality/$name.log" 2>&1
