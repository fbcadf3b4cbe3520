"""The whole path on a CUDA GPU: pretrain a few steps, personalise, generate, export.

Runs the real commands (``datencoder.recipes.cli.main``) on the tiny random base (built here) or
on a given base folder, with the frozen base in half precision, gradient checkpointing on, and
every command on ``--device cuda``; checks each output and prints its time and the CUDA peak.
Without a CUDA device it prints a skip message and exits 0 (nothing is run).

    python benchmarks/cuda_smoke.py [--base DIR --config sd15] [--dtype bf16] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _step(name: str, argv: list[str]) -> None:
    from datencoder.recipes.cli import main

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"cuda_smoke: '{name}' failed (exit {rc}): datencoder {' '.join(argv)}")
    print(f"cuda_smoke: {name:<12} {time.perf_counter() - start:7.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:8.0f} MB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="base model folder (default: build the tiny random base)")
    parser.add_argument("--config", default="tiny", help="pretrain config for the base (default tiny)")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=3, help="pre-training steps (default 3)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_smoke: skipped: no CUDA device here (torch.cuda.is_available() is False); nothing was run")
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="cuda_smoke_"))
    base = args.base
    if base is None:
        from datencoder.testing import build_tiny_base

        base = str(build_tiny_base(out / "tiny-base", text_encoder="clip"))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    device = ["--device", "cuda"]
    print(f"cuda_smoke: {torch.cuda.get_device_name()}, base {base}, dtype {args.dtype}, work in {out}")
    _step("pretrain", ["pretrain", args.config, f"model.pretrained={base}", f"data.root={images}",
                       f"train.output_dir={out / 'run'}", f"train.steps={args.steps}", "train.batch_size=2",
                       "train.checkpoint_every=100", "train.gradient_checkpointing=true",
                       f"train.mixed_precision={'no' if args.dtype == 'fp32' else args.dtype}",
                       "--dtype", args.dtype, *device])
    _step("personalize", ["personalize", str(images / "0.png"), "tune.gradient_checkpointing=true",
                          "--encoder", str(out / "run" / "encoder"), "--out", str(out / "concept"),
                          "--dtype", args.dtype, *device])
    _step("generate", ["generate", str(out / "concept"), "a photo of S* on the beach", "--num-images", "2",
                       "--steps", "10", "--negative-prompt", "blurry", "--out", str(out / "images_out"),
                       "--dtype", args.dtype, *device])
    _step("export", ["export", str(out / "concept"), "--out", str(out / "export")])
    generated = [np.asarray(Image.open(p)) for p in sorted((out / "images_out").glob("0*.png"))]
    if len(generated) != 2 or any(g.std() == 0 for g in generated):
        raise SystemExit("cuda_smoke: generation wrote blank or missing images")
    print(f"cuda_smoke: ok ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
