"""Reference rows for the minisd-emoji comparison: what a perfect generator would score.

For every target and prompt of an evaluation config, the target's own image is composed the way
the data set composes emoji (the prompt's size, position and background; medium, center and
white where the prompt states none) and scored by the same evaluator and the same
``score_images`` as the methods:

- ``ref-composite``: the composite itself (the evaluator's ceiling);
- ``ref-composite-vae``: the composite encoded and decoded by the base model's VAE (the ceiling
  of anything the base model generates, since every sample passes through that decoder).

The records go to OUTPUT/records/<row>.jsonl, next to the methods', so ``datencoder evaluate``
lists them in results.md and the scatter plot.

    python benchmarks/eval_reference.py [--config eval_minisd] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from datencoder.base import load_base  # noqa: E402
from datencoder.config import load_config  # noqa: E402
from datencoder.emoji.data import compose  # noqa: E402
from datencoder.eval.config import EvalConfig  # noqa: E402
from datencoder.eval.records import records_file, write_records  # noqa: E402
from datencoder.eval.scoring import parse_prompt, score_images  # noqa: E402
from datencoder.eval.targets import select_targets  # noqa: E402
from datencoder.emoji.evaluator import load_evaluator  # noqa: E402
from datencoder.image_io import load_image  # noqa: E402
from datencoder.emoji.minisd.sampling import vae_roundtrip  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="eval_minisd")
    parser.add_argument("--output-dir", default=None, help="default: the config's output_dir")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [], cls=EvalConfig)
    out = Path(args.output_dir or cfg.output_dir)
    base = load_base(cfg.base, cfg.image_tower)
    evaluator = load_evaluator(cfg.evaluator)
    rows: dict[str, list[dict]] = {"ref-composite": [], "ref-composite-vae": []}
    for target in select_targets(cfg.targets):
        source = Image.open(target.image).convert("RGBA")
        reference = load_image(target.image)  # what the methods get as their one image
        composites = []
        for prompt in cfg.prompts:
            stated = parse_prompt(prompt)
            image, _ = compose(source, stated.get("size", "medium"), stated.get("position", "center"),
                               stated.get("background", "white"), canvas=base.resolution)
            composites.append(image)
        for name, images in (("ref-composite", composites), ("ref-composite-vae", vae_roundtrip(base.vae, composites))):
            for i, (prompt, rec) in enumerate(zip(cfg.prompts, score_images(evaluator, images, reference,
                                                                             target, cfg.prompts))):
                rows[name].append({"method": name, "kind": "reference", "steps": 0, "target": target.image,
                                   "concept": target.concept, "name": target.name, "category": target.category,
                                   "group": target.group, "prompt": prompt, "prompt_index": i, "seed": 0,
                                   "file": None, **rec, "seconds": None, "peak_mb": None, "hard_word": None})
    for name, records in rows.items():
        write_records(records_file(out, name), records)
        ident = sum(r["identity"] for r in records) / len(records)
        print(f"{name}: {len(records)} images, mean identity {ident:.3f} -> {records_file(out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
