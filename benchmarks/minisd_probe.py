"""Does minisd-emoji follow a prompt's position, size and background? One caption, nine positions.

The same concept, style, size ("small") and background ("white") with each of the nine position
words, two seeds, stock StableDiffusionPipeline (DDIM 25 steps, guidance 7.5). Prints what the
evaluator reads for position, size and background, and writes one grid (a row per seed, a column
per position word).

    python benchmarks/minisd_probe.py [--name "grinning face"] [--out docs/images/minisd_position_probe.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from datencoder.base import load_base  # noqa: E402
from datencoder.emoji.data import POSITIONS  # noqa: E402
from datencoder.emoji.evaluator import load_evaluator  # noqa: E402
from datencoder.image_io import make_grid, save_image_atomic  # noqa: E402
from datencoder.emoji.minisd.sampling import make_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="grinning face")
    parser.add_argument("--style", default="noto")
    parser.add_argument("--size", default="small")
    parser.add_argument("--background", default="white")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="docs/images/minisd_position_probe.png")
    parser.add_argument("--pretrained", default="minisd-emoji",
                        help="the base model: the shipped name or an exported folder (datencoder minisd export)")
    args = parser.parse_args(argv)
    base = load_base(args.pretrained)
    pipe = make_pipeline(base.vae, base.unet, base.scheduler, base.tokenizer, base.text_encoder)
    evaluator = load_evaluator()
    positions = list(POSITIONS)
    prompts = [f"{args.name}, {args.style} style, {args.size}, {p}, on a {args.background} background" for p in positions]
    images, hits = [], {"position": 0, "size": 0, "background": 0}
    for seed in range(args.seeds):
        out = pipe(prompts, num_inference_steps=25, guidance_scale=7.5, height=base.resolution, width=base.resolution,
                   generator=torch.Generator().manual_seed(seed)).images
        pred = evaluator.predict(out)
        for i, p in enumerate(positions):
            got = {h: pred[h]["labels"][i] for h in hits}
            want = {"position": p, "size": args.size, "background": args.background}
            for h in hits:
                hits[h] += int(got[h] == want[h])
            print(json.dumps({"seed": seed, "asked": want, "read": got}))
        images += out
    n = len(positions) * args.seeds
    print("correct: " + ", ".join(f"{h} {v}/{n}" for h, v in hits.items()))
    grid = make_grid(images, cols=len(positions), labels=positions + [""] * (len(images) - len(positions)))
    save_image_atomic(grid.resize((grid.width * 2, grid.height * 2)), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
