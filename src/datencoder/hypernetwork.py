"""Hypernetwork: per-sample low-rank factors for the UNet's attention projections.

Two parameterisations (``encoder.hypernet_mode``):

- ``core`` (default): predicting full factors for every projection of a Stable Diffusion UNet
  (128 of them) from one feature vector would need a head with hundreds of millions of weights.
  Instead each layer l keeps a learned basis ``A_l [r, in]`` and ``U_l [out, r]`` and the network
  predicts a small core ``M_l(x) [r, r]`` per sample; the per-sample factors are

      A_i = A_l,   B_i = U_l @ M_l(x_i)         so   dW_i = U_l M_l(x_i) A_l   (rank <= r).

- ``full``: per-sample A and B themselves, ``A_i = A_l + dA_l(x_i)`` and ``B_i = B_l(x_i)``, from
  linear heads of width r * (in + out) summed over layers: far more capacity (every direction of
  every layer can depend on the image) at hidden_dim x that many weights, affordable on small
  bases; on SD 1.5 about 450 M weights at hidden_dim 512.

The layer producing B (the core in ``core`` mode, B itself in ``full``) is zero-initialised, so
an untrained hypernetwork predicts B = 0 and leaves the UNet exactly unchanged (METHOD.md,
"Offsets"). With ``predict=False`` (the "no hypernetwork" ablation) B stays 0 and only tuning
moves it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Hypernetwork", "MODES"]

MODES = ("core", "full")


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Hypernetwork(nn.Module):
    def __init__(self, layer_shapes: dict[str, tuple[int, int]], hidden_dim: int, rank: int,
                 predict: bool = True, seed: int = 0, mode: str = "core"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"hypernetwork mode must be one of {MODES}, got {mode!r}")
        self.names = list(layer_shapes)
        self.shapes = list(layer_shapes.values())
        self.rank = rank
        self.mode = mode
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList(
            nn.Parameter(torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in))
            for fan_in, _ in layer_shapes.values()
        )
        self.core = self.a_head = self.b_head = None
        if mode == "core":
            self.U = nn.ParameterList(
                nn.Parameter(torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank))
                for _, fan_out in layer_shapes.values()
            )
            self.core = _zero_linear(hidden_dim, len(self.names) * rank * rank) if predict else None
        elif predict:
            # dA starts at 0 too: the first steps move B along the fixed basis A_l, as in core mode
            self.a_head = _zero_linear(hidden_dim, rank * sum(i for i, _ in self.shapes))
            self.b_head = _zero_linear(hidden_dim, rank * sum(o for _, o in self.shapes))

    def forward(self, h: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """h: [N, hidden] -> {name: (A [N, r, in], B [N, out, r])}."""
        if self.mode == "full":
            return self._full(h)
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

    def _full(self, h: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        n, r = h.shape[0], self.rank
        if self.a_head is None:
            d_a = h.new_zeros(n, r * sum(i for i, _ in self.shapes))
            b = h.new_zeros(n, r * sum(o for _, o in self.shapes))
        else:
            d_a, b = self.a_head(h), self.b_head(h)  # [N, r * sum(in)], [N, r * sum(out)]
        d_a = d_a.split([r * i for i, _ in self.shapes], dim=-1)
        b = b.split([r * o for _, o in self.shapes], dim=-1)
        factors = {}
        for i, (name, (fan_in, fan_out)) in enumerate(zip(self.names, self.shapes)):
            A = self.A[i].unsqueeze(0) + d_a[i].view(n, r, fan_in)  # [N, r, in]
            factors[name] = (A, b[i].view(n, fan_out, r))  # B: [N, out, r]
        return factors
