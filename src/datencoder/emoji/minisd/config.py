"""Typed configs of the minisd training stages (YAML files: configs/minisd_*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import check_range, check_seed
from ...errors import DatencoderError
from .data import MiniDataConfig
from .losses import DiffusionLossConfig, VAELossConfig
from .models import MiniUNetConfig, MiniVAEConfig
from ...training import LoopConfig


@dataclass
class MiniTrainConfig:
    work_dir: str = "runs/minisd/stage"
    steps: int = 1000
    """Steps in all (0: only write the starting checkpoint, e.g. of ``init_from`` weights)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much training wall time, summed over resumes; 0: no limit."""
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 100
    """Linear warm-up, then a flat LR."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    """0: no average (exports and caches then use the trained weights)."""
    bf16: bool = True
    """bfloat16 autocast for forward and backward (about 1.7x faster on AVX-512 bf16 CPUs)."""
    threads: int = 2
    seed: int = 0
    checkpoint_minutes: float = 5.0
    sample_every: int = 500
    """Write a sample grid every this many steps (0: never)."""
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise DatencoderError(f"train.threads must be >= 1, got {self.threads}")
        self.loop()  # validates the loop's values

    def loop(self) -> LoopConfig:
        """The training loop's settings (``datencoder.training``)."""
        return LoopConfig.taken_from(self, mixed_precision="bf16" if self.bf16 else "no")


@dataclass
class VAEStageConfig:
    model: MiniVAEConfig = field(default_factory=MiniVAEConfig)
    data: MiniDataConfig = field(default_factory=MiniDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: MiniTrainConfig = field(default_factory=lambda: MiniTrainConfig(work_dir="runs/minisd/vae"))
    init_from: str = ""
    """A VAE stage folder whose EMA weights start this run (same architecture); empty: random init."""
    decoder_only: bool = False
    """Train the decoder (and post_quant_conv) only: the encoder, hence the latent space a UNet was
    trained on and its cached latents, stays exactly as it was. Needs ``init_from``."""

    def __post_init__(self) -> None:
        if self.decoder_only and not self.init_from:
            raise DatencoderError("decoder_only=true needs init_from=VAE_STAGE_FOLDER (the encoder to keep)")


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
