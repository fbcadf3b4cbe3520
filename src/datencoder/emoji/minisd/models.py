"""Architecture configs and builders for the miniature VAE, UNet and noise scheduler.

Every dimension comes from these dataclasses (and the text encoder's hidden size), so the
same builders make the shipped model and the tiny models of the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ...config import check_range
from ...errors import DatencoderError


def _check_channels(cfg) -> None:
    if not cfg.block_out_channels or min(cfg.block_out_channels) < 1:
        raise DatencoderError(f"model.block_out_channels must be a non-empty list of positive widths, "
                              f"got {cfg.block_out_channels}")
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise DatencoderError(
            f"model.block_out_channels {bad} must be multiples of model.norm_num_groups={cfg.norm_num_groups}"
        )


@dataclass
class MiniVAEConfig:
    """AutoencoderKL: ``resolution``² RGB -> (resolution / 2^(blocks-1))² x latent_channels."""

    resolution: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        check_range(self, "model", ">= 1", "resolution", "layers_per_block", "latent_channels", "norm_num_groups")
        _check_channels(self)
        if self.resolution % 2 ** (len(self.block_out_channels) - 1):
            raise DatencoderError(f"model.resolution {self.resolution} must be divisible by "
                                  f"2^{len(self.block_out_channels) - 1} (one halving per extra block)")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.block_out_channels) - 1)


@dataclass
class MiniUNetConfig:
    """UNet2DConditionModel on the VAE's latents; ``cross_attention`` marks blocks with text."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    cross_attention: list[bool] = field(default_factory=lambda: [False, True, False])
    """Per resolution level, highest first. Default: text only at the middle level (plus the mid
    block); attention at the 16x16 level made a training step 2.3x slower on CPU."""
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        check_range(self, "model", ">= 1", "layers_per_block", "attention_head_dim", "norm_num_groups")
        _check_channels(self)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise DatencoderError(
                "unet.cross_attention needs one true/false per entry of unet.block_out_channels"
            )


@contextlib.contextmanager
def seeded_init(seed: int):
    """diffusers initialises weights from the global RNG; fork it so a build is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_vae(cfg: MiniVAEConfig, scaling_factor: float = 1.0) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
        scaling_factor=scaling_factor,
    )


def build_unet(cfg: MiniUNetConfig, vae: MiniVAEConfig, text_dim: int) -> UNet2DConditionModel:
    """``text_dim``: hidden size of the text encoder (the cross-attention context width)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
    return UNet2DConditionModel(
        sample_size=vae.latent_size,
        in_channels=vae.latent_channels,
        out_channels=vae.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_scheduler(num_train_timesteps: int, prediction_type: str, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The SD 1.x noise schedule (scaled linear betas) with the chosen prediction target.

    ``zero_terminal_snr`` rescales the betas so the last step is pure noise and samples with
    "trailing" timesteps (Lin et al. 2024, as in diffusers' ``rescale_betas_zero_snr``); both
    settings travel in the saved scheduler config, so stock pipelines sample the same way.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise DatencoderError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise DatencoderError("zero_terminal_snr needs prediction_type v_prediction (epsilon is undefined at SNR 0)")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        **extra,
    )
