"""The encoder's inputs (E4T backbone, METHOD.md): image-tower and denoiser features.

Both feature paths are frozen. Image features pool several hidden layers of any transformers
vision model; denoiser features pool the outputs of the UNet's down and mid blocks, run on the
noisy latent z_t at the sampled timestep with a neutral prompt (SDXL: plus the prompt's pooled
text and size ids in the time embedding, as in every SDXL UNet call). Widths are measured from the
models themselves (one dry run), so nothing model-specific is hard-coded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import TextStates, added_cond_kwargs, encode_text
from .config import EncoderConfig

__all__ = ["FeatureExtractor", "timestep_features"]


def _pool(hidden: Tensor) -> Tensor:
    """[N, T, C] tokens or [N, C, H, W] maps -> [N, C]."""
    if hidden.dim() == 3:
        return hidden.mean(dim=1)
    if hidden.dim() == 4:
        return hidden.mean(dim=(2, 3))
    raise ValueError(f"cannot pool a hidden state of shape {tuple(hidden.shape)}")


def timestep_features(timesteps: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the timestep: [N] -> [N, dim]."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(timesteps.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class FeatureExtractor:
    """Frozen feature paths of one base model (not an ``nn.Module``: it owns no weights)."""

    def __init__(self, base, cfg: EncoderConfig):
        self.base = base
        self.cfg = cfg
        if base.image_tower is None:
            from .errors import DatencoderError

            raise DatencoderError(
                f"base model '{base.name}' has no image tower; pass model.image_tower=PATH_OR_HUB_ID "
                "(any transformers vision model, e.g. a CLIPVisionModel folder)"
            )
        with torch.no_grad():  # the dry run's input lives where the tower does (CUDA, meta, ...)
            tower = next(base.image_tower.parameters())
            dummy = torch.zeros(1, 3, base.image_size, base.image_size, dtype=tower.dtype, device=tower.device)
            self.image_width = int(self.image(dummy).shape[-1])
        self.denoiser_width = 0
        if cfg.use_denoiser_features:
            channels = list(base.unet.config.block_out_channels)
            self.denoiser_width = sum(channels) + channels[-1]  # one per down block, plus the mid block
        self._neutral: TextStates | None = None

    @property
    def _tower_dtype(self) -> torch.dtype:
        return next(self.base.image_tower.parameters()).dtype

    @property
    def width(self) -> int:
        return self.image_width + self.denoiser_width

    def preprocess(self, pixels: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> the tower's normalised input at its resolution."""
        size = self.base.image_size
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.base.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.base.image_std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self._tower_dtype)

    @torch.no_grad()
    def image(self, pixels: Tensor) -> Tensor:
        """Pooled tower features of the concept image: [N, 3, H, W] -> [N, len(layers) * C]."""
        out = self.base.image_tower(pixel_values=self.preprocess(pixels), output_hidden_states=True)
        hidden = out.hidden_states
        bad = [i for i in self.cfg.tower_layers if not -len(hidden) <= i < len(hidden)]
        if bad:
            from .errors import DatencoderError

            raise DatencoderError(f"encoder.tower_layers {bad} out of range: the image tower has "
                                  f"{len(hidden)} hidden states (use indices -{len(hidden)}..{len(hidden) - 1})")
        return torch.cat([_pool(hidden[i]).float() for i in self.cfg.tower_layers], dim=-1)

    def neutral_text(self, batch: int) -> TextStates:
        if self._neutral is None:
            with torch.no_grad():
                self._neutral = encode_text(self.base, [self.cfg.neutral_prompt])
        pooled = self._neutral.pooled
        return TextStates(self._neutral.states.expand(batch, -1, -1),
                          None if pooled is None else pooled.expand(batch, -1))

    @torch.no_grad()
    def denoiser(self, z_t: Tensor, timesteps: Tensor) -> Tensor:
        """Pooled outputs of the frozen UNet's down and mid blocks on z_t: [N, C, h, w] -> [N, Fd]."""
        unet = self.base.unet
        dtype = next(unet.parameters()).dtype
        neutral = self.neutral_text(z_t.shape[0])
        context = neutral.states.to(z_t.device, dtype)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype))
        added = added_cond_kwargs(self.base, neutral)
        if added is not None:  # SDXL: UNet2DConditionModel.forward adds the text_time embedding
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        h = unet.conv_in(z_t.to(dtype))
        pooled = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            pooled.append(_pool(h).float())
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
            pooled.append(_pool(h).float())
        return torch.cat(pooled, dim=-1)

    def __call__(self, pixels: Tensor, z_t: Tensor | None, timesteps: Tensor) -> Tensor:
        """All features of a batch: [N, width]."""
        feats = [self.image(pixels)]
        if self.cfg.use_denoiser_features:
            feats.append(self.denoiser(z_t, timesteps))
        return torch.cat(feats, dim=-1)
