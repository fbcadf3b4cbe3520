"""Augmented copies of one concept image (random resized crop + horizontal flip), in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_views"]


def augment_views(pixels: Tensor, n: int, generator: torch.Generator, hflip: bool = True,
                  scale_min: float = 0.8) -> Tensor:
    """[3, H, W] -> [n, 3, H, W]: each view a random square crop of area in [scale_min, 1]."""
    _, h, w = pixels.shape
    views = []
    for _ in range(n):
        scale = scale_min + (1 - scale_min) * float(torch.rand((), generator=generator))
        side = max(1, round(min(h, w) * scale**0.5))
        top = int(torch.randint(0, h - side + 1, (), generator=generator))
        left = int(torch.randint(0, w - side + 1, (), generator=generator))
        crop = pixels[:, top:top + side, left:left + side].unsqueeze(0)  # [1, 3, s, s]
        if side != h or side != w:
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if hflip and float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(-1)
        views.append(crop)
    return torch.cat(views).clamp(-1, 1)
