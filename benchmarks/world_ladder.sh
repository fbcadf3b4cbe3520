#!/usr/bin/env bash
# The world's size ladder: the shipped minisd-emoji UNet continued on worlds of 32, 64 and 128
# concepts (nested: each world is the first N of one order), the same steps each, then each
# exported and scored by benchmarks/minisd_quality.py --world on the 128-concept world's prompts
# (among-world top-1/top-5 for its own world and for the 32 concepts all three share).
# Run from the folder holding data/ and runs/ (here /work):
#   bash main/benchmarks/world_ladder.sh STEPS [SIZES...]
set -euo pipefail
steps=${1:-300}; shift || true
sizes=${*:-32 64 128}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
here=$(cd "$(dirname "$0")/.." && pwd)
for n in $sizes; do
    [ -f data/world$n.json ] || datencoder data world --data data/emoji --size "$n" --out data/world$n.json
    datencoder minisd cache "$here/configs/minisd_unet_world.yaml" data.world=data/world$n.json \
        cache_dir=runs/minisd/cache_world$n
done
# the rungs train side by side, one thread each: the ladder compares quality at equal steps, not speed
for n in $sizes; do
    datencoder minisd unet "$here/configs/minisd_unet_world.yaml" data.world=data/world$n.json \
        cache_dir=runs/minisd/cache_world$n train.work_dir=runs/ladder/w$n train.steps="$steps" \
        train.threads=1 > runs/ladder/w$n.log 2>&1 &
done
wait
