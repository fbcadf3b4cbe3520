"""Typed configs of the minisd training stages (YAML files: configs/minisd_*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import check_range, check_seed
from ...errors import DatencoderError
from .data import MiniDataConfig
from .losses import DiffusionLossConfig, VAELossConfig
from .models import MiniUNetConfig, MiniVAEConfig
from .training import MiniTrainConfig


@dataclass
class VAEStageConfig:
    model: MiniVAEConfig = field(default_factory=MiniVAEConfig)
    data: MiniDataConfig = field(default_factory=MiniDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: MiniTrainConfig = field(default_factory=lambda: MiniTrainConfig(work_dir="runs/minisd/vae"))


@dataclass
class GridConfig:
    num_prompts: int = 8
    """Captions of this many train examples, spread over the manifest, with their real images
    (0: no sample grids)."""
    seeds: int = 2
    """Rows of samples per grid, one per seed."""
    steps: int = 25
    guidance: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(self, "grid", ">= 0", "num_prompts")  # 0: no sample grids
        check_range(self, "grid", ">= 1", "seeds", "steps")
        check_range(self, "grid", "finite", "guidance")
        check_seed(self.seed, "grid.seed")


@dataclass
class UNetStageConfig:
    vae_dir: str = "runs/minisd/vae"
    """Work dir of the VAE stage (its EMA weights encode the latents and decode samples)."""
    cache_dir: str = "runs/minisd/cache"
    export_dir: str = ""
    """Where ``export`` writes the diffusers folders; empty: the package's assets/minisd-emoji."""
    cache_parts: list[str] = field(default_factory=lambda: ["text", "latents"])
    """What ``cache`` computes: text states need only the text encoder, latents the trained VAE."""
    init_from: str = ""
    """Work dir of an earlier UNet run whose EMA weights start this one (fresh optimizer and
    step count; for a changed objective or schedule). Ignored by ``--resume``."""
    model: MiniUNetConfig = field(default_factory=MiniUNetConfig)
    data: MiniDataConfig = field(default_factory=MiniDataConfig)
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    train: MiniTrainConfig = field(default_factory=lambda: MiniTrainConfig(work_dir="runs/minisd/unet"))
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self) -> None:
        bad = [p for p in self.cache_parts if p not in ("text", "latents")]
        if bad:
            raise DatencoderError(f"cache_parts may hold 'text' and 'latents', got {bad}")
