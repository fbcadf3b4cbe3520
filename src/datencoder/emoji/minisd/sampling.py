"""Sample grids for judging training progress by eye."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from ...io import to_pil, to_pixels, to_uint8, write_atomic


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """rows: tensors (n, 3, H, W) in [-1, 1], one grid row each; written atomically as PNG."""
    grid = torch.cat([torch.cat(list(r.float()), dim=2) for r in rows], dim=1)  # 3, rows*H, n*W
    image = to_pil(grid)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def make_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDPMScheduler, tokenizer, text_encoder) -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline over our parts, with a DDIM sampler of the training schedule."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """(len(prompts), 3, H, W) in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt")
    return out.images * 2 - 1


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, images: list[Image.Image], batch_size: int = 64) -> list[Image.Image]:
    """RGB images encoded (posterior mean) and decoded: what a generator perfect up to the decoder gives."""
    x = to_pixels(np.stack([np.asarray(i.convert("RGB")) for i in images]))  # [N, 3, H, W]
    out = []
    for start in range(0, len(x), batch_size):
        y = vae.decode(vae.encode(x[start : start + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
        out.append(to_uint8(y).numpy())
    return [Image.fromarray(a) for a in np.concatenate(out)]
