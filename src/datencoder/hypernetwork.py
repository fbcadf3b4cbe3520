"""Hypernetwork: per-sample low-rank factors for the UNet's attention projections.

Predicting full factors for every projection of a Stable Diffusion UNet (128 of them) from one
feature vector would need a head with hundreds of millions of weights. Instead each layer l
keeps a learned basis ``A_l [r, in]`` and ``U_l [out, r]`` and the network predicts a small core
``M_l(x) [r, r]`` per sample; the per-sample factors are

    A_i = A_l,   B_i = U_l @ M_l(x_i)         so   dW_i = U_l M_l(x_i) A_l   (rank <= r).

The layer producing ``M`` is zero-initialised, so an untrained hypernetwork predicts B = 0 and
leaves the UNet exactly unchanged (METHOD.md, "Offsets"). With ``predict=False`` (the "no
hypernetwork" ablation) M stays 0 and only tuning moves B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Hypernetwork"]


class Hypernetwork(nn.Module):
    def __init__(self, layer_shapes: dict[str, tuple[int, int]], hidden_dim: int, rank: int,
                 predict: bool = True, seed: int = 0):
        super().__init__()
        self.names = list(layer_shapes)
        self.rank = rank
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList(
            nn.Parameter(torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in))
            for fan_in, _ in layer_shapes.values()
        )
        self.U = nn.ParameterList(
            nn.Parameter(torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank))
            for _, fan_out in layer_shapes.values()
        )
        self.core = nn.Linear(hidden_dim, len(self.names) * rank * rank) if predict else None
        if self.core is not None:
            nn.init.zeros_(self.core.weight)
            nn.init.zeros_(self.core.bias)

    def forward(self, h: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """h: [N, hidden] -> {name: (A [N, r, in], B [N, out, r])}."""
        n, r = h.shape[0], self.rank
        if self.core is None:
            cores = h.new_zeros(n, len(self.names), r, r)
        else:
            cores = self.core(h).view(n, len(self.names), r, r)  # [N, L, r, r]
        factors = {}
        for i, name in enumerate(self.names):
            A = self.A[i].unsqueeze(0).expand(n, -1, -1)  # [N, r, in]
            B = self.U[i] @ cores[:, i]  # [out, r] @ [N, r, r] -> [N, out, r]
            factors[name] = (A, B)
        return factors
