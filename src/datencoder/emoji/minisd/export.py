"""Write the trained VAE, UNet and scheduler as the diffusers-layout ``minisd-emoji`` folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .data import TEXT_ENCODER_PACKAGE
from ...io import ASSETS


def default_export_dir() -> Path:
    return ASSETS / "minisd-emoji"


def export_minisd(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    max_length: int,
    out_dir: Path,
    name: str = "minisd-emoji",
) -> Path:
    """fp16 safetensors in vae/, unet/, scheduler/ plus datencoder_base.json (and README.txt in the package).

    Each part is written to a temporary folder beside ``out_dir`` and then swapped in, so a
    reader never sees half a part. Anything else in ``out_dir`` (e.g. the image tower that
    another stage ships in the same folder) is left alone. The text encoder is not copied:
    the loader imports its package.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae.to(torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
    unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
    vae.to(torch.float32)
    unet.to(torch.float32)
    scheduler.save_pretrained(tmp / "scheduler")
    base = {
        "name": name,
        "text_encoder": {"python_package": TEXT_ENCODER_PACKAGE},
        "tokenizer": {"python_package": TEXT_ENCODER_PACKAGE, "model_max_length": max_length},
    }
    (tmp / "datencoder_base.json").write_text(json.dumps(base, indent=2) + "\n")
    for part in ("vae", "unet", "scheduler"):
        old = out_dir / f".{part}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (out_dir / part).exists():
            (out_dir / part).rename(old)
        (tmp / part).rename(out_dir / part)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp / "datencoder_base.json", out_dir / "datencoder_base.json")
    shutil.rmtree(tmp, ignore_errors=True)
    if out_dir.resolve() == default_export_dir():
        # How to load the shipped folder without datencoder (the code finds the installed package).
        from ...export_base import assembly_readme

        (out_dir / "README.txt").write_text(assembly_readme(name))
    return out_dir
