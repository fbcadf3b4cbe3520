"""The two training objectives: VAE reconstruction + KL, and the latent diffusion loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ...config import check_choice, check_range
from ...errors import DatencoderError
from ...diffusion import diffusion_target, min_snr_weights


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    """Weight of the per-sample summed KL (SD-style: a light pull toward N(0, I))."""

    def __post_init__(self) -> None:
        check_range(self, "loss", ">= 0", "l1_weight", "mse_weight", "kl_weight")


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
    weighting: str = "min_snr"
    """``min_snr``: x0-error weight min(SNR, gamma), the usual form, which all but ignores the
    noisiest steps (weight ~SNR there). ``min_snr_plus_one`` (v-prediction only): x0-error
    weight min(SNR + 1, gamma), i.e. plain v-MSE capped at gamma, so the noisiest steps, where
    the layout is decided, keep full weight."""
    zero_terminal_snr: bool = False
    """Rescale the betas to zero terminal SNR (Lin et al. 2024): the last training step sees pure
    noise, as sampling does, so the layout must come from the text and cannot leak through the
    noise. Needs v-prediction; saved into the scheduler config (``rescale_betas_zero_snr``)."""

    def __post_init__(self) -> None:
        check_range(self, "diffusion", ">= 1", "num_train_timesteps")
        check_range(self, "diffusion", ">= 0", "snr_gamma")
        check_choice(self, "diffusion", "prediction_type", ("epsilon", "v_prediction"))
        check_choice(self, "diffusion", "weighting", ("min_snr", "min_snr_plus_one"))
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise DatencoderError("diffusion.zero_terminal_snr needs diffusion.prediction_type v_prediction "
                                  "(epsilon is undefined at SNR 0)")


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
    target = diffusion_target(scheduler, latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=text_states).sample.float()
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    raw = per_sample.mean()
    loss = (loss_weights(scheduler, t, cfg) * per_sample).mean() if cfg.snr_gamma > 0 else raw
    return {"loss": loss, "mse": raw.detach()}


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, cfg: DiffusionLossConfig) -> torch.Tensor:
    """Per-sample weights of the prediction MSE for ``cfg.weighting`` (see DiffusionLossConfig)."""
    if cfg.weighting not in ("min_snr", "min_snr_plus_one"):
        raise DatencoderError(f"weighting must be 'min_snr' or 'min_snr_plus_one', got {cfg.weighting!r}")
    return min_snr_weights(scheduler, timesteps, cfg.snr_gamma, plus_one=cfg.weighting == "min_snr_plus_one")
