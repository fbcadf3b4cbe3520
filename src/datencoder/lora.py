"""Low-rank weight offsets: dW = scale * B @ A (METHOD.md, "Offsets").

Factors are *per sample*: ``A`` is ``[N, r, in]`` and ``B`` is ``[N, out, r]``, so one batch can
hold different concepts. A hidden-state batch of size ``M`` (``M`` a multiple of ``N``, e.g.
``2N`` under classifier-free guidance, where diffusers concatenates ``[uncond, cond]``) uses the
factors of sample ``i % N`` for row ``i``.

This module is the only place the offset formula is written down: ``delta_weight`` gives the
dense offset (export, merging) and ``lora_linear`` applies the same offset in factored form
without materialising ``[N, out, in]``; a test checks that the two agree.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["delta_weight", "lora_linear", "tile_to_batch", "factor_shapes"]


def delta_weight(A: Tensor, B: Tensor, scale: float = 1.0) -> Tensor:
    """Dense offset ``scale * B @ A``: ``[..., out, r] @ [..., r, in] -> [..., out, in]``."""
    return scale * (B @ A)


def tile_to_batch(x: Tensor, batch: int) -> Tensor:
    """Repeat a per-sample tensor ``[N, ...]`` to ``[batch, ...]`` (row i uses sample i % N)."""
    n = x.shape[0]
    if batch == n:
        return x
    if batch % n:
        raise ValueError(f"batch of {batch} rows is not a multiple of {n} samples")
    return x.repeat(batch // n, *([1] * (x.dim() - 1)))


def lora_linear(linear: nn.Linear, x: Tensor, A: Tensor | None, B: Tensor | None, scale: float = 1.0) -> Tensor:
    """``linear(x)`` with per-sample offsets: ``x (W + scale * B_i A_i)^T + b``.

    x: [M, L, in]; A: [N, r, in]; B: [N, out, r]. Without factors this is exactly ``linear(x)``.
    """
    out = linear(x)
    if A is None or B is None:
        return out
    A = tile_to_batch(A, x.shape[0]).to(x.dtype)  # [M, r, in]
    B = tile_to_batch(B, x.shape[0]).to(x.dtype)  # [M, out, r]
    low = torch.bmm(x, A.transpose(1, 2))  # [M, L, r]
    return out + scale * torch.bmm(low, B.transpose(1, 2))  # [M, L, out]


def factor_shapes(linear: nn.Linear, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of one sample's (A, B) for ``linear``: ((r, in), (out, r))."""
    return (rank, linear.in_features), (linear.out_features, rank)
