"""What a diffusion loss regresses to, and the Min-SNR weights of its terms, for any scheduler.

Shared by the method's objective and by anything else that trains a denoiser on the same
schedulers (the proving ground's miniature UNet), so neither imports the other's loss code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DatencoderError

__all__ = ["diffusion_target", "min_snr_weights"]


def min_snr_weights(scheduler, timesteps: Tensor, gamma: float, plus_one: bool = False) -> Tensor:
    """Min-SNR-gamma weights of the prediction MSE (Hang et al. 2023) for the scheduler's target.

    The x0-error weight is min(SNR, gamma), or with ``plus_one`` min(SNR + 1, gamma) (plain v-MSE
    capped at gamma, which keeps the noisiest steps at full weight; v-prediction only). Finite at
    zero terminal SNR for v-prediction.
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    if plus_one:
        if not v_pred:
            raise DatencoderError("the min_snr_plus_one weighting needs prediction_type v_prediction")
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    capped = torch.clamp(snr, max=gamma)
    return capped / (snr + 1) if v_pred else capped / snr


def diffusion_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise DatencoderError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction, sample)")
