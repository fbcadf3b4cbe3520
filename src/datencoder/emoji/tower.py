"""The embedded default's image tower: a small CLIP vision transformer aligned to MiniLM text.

The tuning encoder reads concept-image features from a CLIP image tower (E4T, and the paper's
backbone). Our miniature Stable Diffusion uses MiniLM as its text encoder, so we train a small
``transformers.CLIPVisionModel`` contrastively (CLIP's symmetric InfoNCE with a learnable
temperature) against *frozen* MiniLM sentence embeddings of the captions. The tower then speaks
the same semantic space as the text side, as the original CLIP towers do for SD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ..config import check_range
from ..errors import DatencoderError
from ..io import atomic_dir

__all__ = [
    "TowerArch",
    "ContrastiveTower",
    "clip_loss",
    "sentence_embeddings",
    "retrieval_accuracy",
    "save_tower",
]

logger = logging.getLogger(__name__)


@dataclass
class TowerArch:
    """CLIPVisionConfig fields of the tower (the rest keep transformers' defaults)."""

    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    intermediate_size: int = 768

    def __post_init__(self) -> None:
        check_range(self, "model", ">= 1", "image_size", "patch_size", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "intermediate_size")
        if self.image_size % self.patch_size or self.hidden_size % self.num_attention_heads:
            raise DatencoderError(f"model.image_size must be a multiple of model.patch_size and model.hidden_size "
                                  f"of model.num_attention_heads, got {self.image_size}/{self.patch_size}, "
                                  f"{self.hidden_size}/{self.num_attention_heads}")

    def to_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            projection_dim=self.hidden_size,
        )


class ContrastiveTower(nn.Module):
    """CLIPVisionModel + linear projection into the text space + learnable temperature."""

    def __init__(self, arch: TowerArch, text_dim: int, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(arch.to_config())
        self.proj = nn.Linear(arch.hidden_size, text_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / init_temperature).log())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, text_dim] unit-norm image embeddings."""
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # [B, hidden]
        return F.normalize(self.proj(pooled), dim=-1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image_i, text_i) unit vectors."""
    # CLIP clamps the scale at 100 so the softmax cannot collapse to one-hot early on.
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_emb @ text_emb.t()  # [B, B]
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@torch.no_grad()
def sentence_embeddings(texts: list[str], model, tokenizer, batch_size: int = 256) -> torch.Tensor:
    """sentence-transformers pooling of a MiniLM: masked mean of the last hidden state, L2-normalised."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # [B, L, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(mean.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Caption -> image retrieval: for each caption, is its own image among the top-k images?"""
    sims = text_emb @ image_emb.t()  # [N captions, N images]
    own = sims.diagonal().unsqueeze(1)
    rank = (sims > own).sum(dim=1)  # images scoring strictly above the right one
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def save_tower(vision: CLIPVisionModel, out_dir: str | Path, mean: list[float], std: list[float]) -> Path:
    """Write a CLIPVisionModel folder (fp16 safetensors) plus a CLIPImageProcessor config.

    Written into a temporary sibling folder first, then swapped in, so readers never see a
    half-written tower.
    """
    out = Path(out_dir)
    size = vision.config.image_size
    with atomic_dir(out) as tmp:
        half = CLIPVisionModel(vision.config).to(torch.float16)
        half.load_state_dict({k: v.to(torch.float16) for k, v in vision.state_dict().items()})
        half.save_pretrained(tmp, safe_serialization=True)
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(mean),
            image_std=list(std),
        )
        processor.save_pretrained(tmp)
    return out
