"""The two training objectives: VAE reconstruction + KL, and the latent diffusion loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    """Weight of the per-sample summed KL (SD-style: a light pull toward N(0, I))."""


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, cfg: VAELossConfig) -> dict[str, torch.Tensor]:
    """images: (B, 3, H, W) in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    # Sample with the explicit generator (the posterior's own sample() would draw its own noise).
    eps = torch.randn(posterior.mean.shape, generator=generator)
    z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
    recon = vae.decode(z).sample.float()
    l1 = F.l1_loss(recon, images)
    mse = F.mse_loss(recon, images)
    kl = posterior.kl().float().mean()
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


@dataclass
class DiffusionLossConfig:
    num_train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 0 switches it off."""


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod[timesteps].float()
    return a / (1 - a)


def diffusion_loss(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    cfg: DiffusionLossConfig,
) -> dict[str, torch.Tensor]:
    """latents: (B, C, h, w), already multiplied by the VAE scaling factor; text_states: (B, L, D)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    if cfg.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = unet(noisy, t, encoder_hidden_states=text_states).sample.float()
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    raw = per_sample.mean()
    if cfg.snr_gamma > 0:
        s = snr(scheduler, t)
        clipped = torch.clamp(s, max=cfg.snr_gamma)
        # Equal-weight the x0 error, capped at gamma; in v-space x0-weight snr becomes snr + 1.
        weight = clipped / (s + 1) if cfg.prediction_type == "v_prediction" else clipped / s
        loss = (weight * per_sample).mean()
    else:
        loss = raw
    return {"loss": loss, "mse": raw.detach()}
