"""Write the trained VAE, UNet and scheduler as the diffusers-layout ``minisd-emoji`` folder."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .data import TEXT_ENCODER_PACKAGE
from ...io import ASSETS, atomic_dir, write_text_atomic


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
    # every part is staged before any is swapped in (the stack exits after the last write), so
    # an error part-way leaves all three old parts in place
    with contextlib.ExitStack() as stack:
        tmp = {part: stack.enter_context(atomic_dir(out_dir / part)) for part in ("vae", "unet", "scheduler")}
        try:
            vae.to(torch.float16).save_pretrained(tmp["vae"], safe_serialization=True)
            unet.to(torch.float16).save_pretrained(tmp["unet"], safe_serialization=True)
        finally:
            vae.to(torch.float32)
            unet.to(torch.float32)
        scheduler.save_pretrained(tmp["scheduler"])
    base = {
        "name": name,
        "text_encoder": {"python_package": TEXT_ENCODER_PACKAGE},
        "tokenizer": {"python_package": TEXT_ENCODER_PACKAGE, "model_max_length": max_length},
    }
    write_text_atomic(out_dir / "datencoder_base.json", json.dumps(base, indent=2) + "\n")
    if out_dir.resolve() == default_export_dir():
        # How to load the shipped folder without datencoder (the code finds the installed package).
        from ...export_base import assembly_readme

        write_text_atomic(out_dir / "README.txt", assembly_readme(name))
    return out_dir
