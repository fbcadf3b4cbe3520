"""The embedded default model ``minisd-emoji``: a miniature latent Stable Diffusion.

Same component classes as Stable Diffusion (diffusers ``AutoencoderKL``,
``UNet2DConditionModel`` with cross-attention, ``DDPMScheduler``) at emoji scale, conditioned
on a frozen pretrained MiniLM text encoder. Training stages live in ``recipes/minisd.py``.
"""

from .models import MiniUNetConfig, MiniVAEConfig, build_scheduler, build_unet, build_vae

__all__ = ["MiniUNetConfig", "MiniVAEConfig", "build_scheduler", "build_unet", "build_vae"]
