"""``datencoder minisd STAGE CONFIG [key=value ...] [--resume]``: train the embedded default.

Stages run in order: ``vae`` (AutoencoderKL on 64x64 emoji), ``cache`` (frozen MiniLM text
states and VAE latents), ``unet`` (UNet2DConditionModel on the cached latents), ``export``
(fp16 diffusers folders into assets/minisd-emoji); ``tower`` and ``evaluator`` train the image tower and
the measuring CNN. The stages live in ``datencoder.emoji.minisd``; new ones register in ``STAGES``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ..config import load_config
from ..emoji.minisd.config import UNetStageConfig, VAEStageConfig
from ..emoji.minisd.extra_stages import EvaluatorStageConfig, TowerStageConfig, run_evaluator, run_tower
from ..emoji.minisd.stages import run_cache, run_export, run_unet, run_vae


@dataclass
class Stage:
    config_cls: type
    run: Callable[[object, bool], int]
    help: str


STAGES: dict[str, Stage] = {
    "vae": Stage(VAEStageConfig, run_vae, "train the AutoencoderKL"),
    "cache": Stage(UNetStageConfig, run_cache, "cache MiniLM text states and VAE latents"),
    "unet": Stage(UNetStageConfig, run_unet, "train the UNet on cached latents"),
    "export": Stage(UNetStageConfig, run_export, "write fp16 diffusers folders to assets/minisd-emoji"),
    "tower": Stage(TowerStageConfig, run_tower, "train the image tower (CLIP vision vs frozen MiniLM)"),
    "evaluator": Stage(EvaluatorStageConfig, run_evaluator, "train the measuring CNN (assets/evaluator)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGES), help="; ".join(f"{k}: {s.help}" for k, s in STAGES.items()))
    parser.add_argument("config", help="YAML config file or shipped name (minisd_vae, minisd_unet)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")


def run(args: argparse.Namespace) -> int:
    stage = STAGES[args.stage]
    cfg = load_config(args.config, args.overrides, cls=stage.config_cls)
    return stage.run(cfg, args.resume)
