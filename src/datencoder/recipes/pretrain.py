"""``datencoder pretrain CONFIG [key=value ...] [--resume] [--max-steps N]``: pre-train the encoder.

The training itself is ``datencoder.pretraining.pretrain`` (on ``datencoder.training``'s loop); this
recipe parses the command line and prints the summary.
"""

from __future__ import annotations

import argparse

from ..base import resolve_device
from ..config import load_config
from ..errors import DatencoderError
from ..pretraining import pretrain

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file or shipped name (tiny, minisd_encoder, sd15)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT/checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N steps in this invocation (checkpointed; the LR schedule still spans train.steps)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default): accelerate's device per process, CUDA when present; cpu forces the CPU")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="precision of the frozen base (sets train.base_dtype; default: the config's, fp32)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.base_dtype={args.dtype}"] if args.dtype else [])
    cfg = load_config(args.config, overrides)
    if args.max_steps is not None and args.max_steps < 1:
        raise DatencoderError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.device == "cuda":
        resolve_device(args.device)  # a missing CUDA is a one-line error
    result = pretrain(cfg, resume=args.resume, max_steps=args.max_steps,
                      device=None if args.device == "auto" else args.device)
    if result.is_main:
        print(f"pretrain: step {result.step}/{cfg.train.steps} ({result.steps_this_run} this run), "
              f"{result.seconds_per_step:.3f} s/step, final loss {result.final_loss:.4f}, "
              f"encoder in {result.output_dir / 'encoder'}")
    return 0
