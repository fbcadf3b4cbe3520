"""Hypernetwork: per-sample low-rank factors for the UNet's attention projections.

Three parameterisations (``encoder.hypernet_mode``):

- ``factorized`` (default): per-sample A and B in learned per-layer subspaces, from a small
  per-sample code. A shared linear map gives the code ``c = C h [d]``; a small linear map per
  layer l turns it into two coefficient matrices ``P_l(c) [r, k]`` and ``Q_l(c) [k, r]``; per-layer
  bases ``V_l [k, in]`` and ``U_l [out, k]`` (k = ``basis_dim``) give

      A_i = A_l + P_l(c_i) V_l,     B_i = U_l Q_l(c_i)      (dW_i = B_i A_i, rank <= r).

  This is ``full`` with its head factorised (basis x per-layer map x shared code): every layer's
  A and B depend on the image, but the weights grow as (k + r) * sum(in + out) plus
  L * d * 2rk, not as hidden * r * sum(in + out) (docs/scale.md: about 0.7 % of SD 1.5's UNet and
  1.4 % of SDXL's).
- ``core``: each layer keeps a learned basis ``A_l [r, in]`` and ``U_l [out, r]`` and the network
  predicts a small core ``M_l(h) [r, r]`` per sample: ``A_i = A_l``, ``B_i = U_l M_l(h_i)``.
- ``full``: per-sample A and B themselves, ``A_i = A_l + dA_l(h_i)`` and ``B_i = B_l(h_i)``, from
  linear heads of width r * (in + out) summed over layers: hidden x that many weights (12 M on
  minisd-emoji, 817 M on SD 1.5 at hidden 1024); ``encoder.max_head_fraction`` refuses it at scale.

The layer producing B (``Q_l``'s maps, the core, B's head) is zero-initialised, so an untrained
hypernetwork predicts B = 0 and leaves the UNet exactly unchanged (METHOD.md, "Offsets"); A's
per-sample part starts at 0 too. With ``predict=False`` (the "no hypernetwork" ablation) B stays
0 and only tuning moves it. ``weight_counts`` gives each part's size from the shapes alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Hypernetwork", "MODES", "TUNED_BY_HEADS", "weight_counts"]

MODES = ("factorized", "core", "full")

TUNED_BY_HEADS = {"factorized": ("code", "maps"), "core": ("A", "U", "core"), "full": ("A", "a_head", "b_head")}
"""The parts ``tune.tune_heads`` tunes per mode. ``factorized``: the per-sample maps only, its
k-wide bases (most of its weights) stay shared; ``core`` and ``full``: every part, as they always
did (``core``'s bases are as small as the factors, ``full`` is bounded by the size limit)."""


def weight_counts(layer_shapes: dict[str, tuple[int, int]], hidden_dim: int, rank: int, predict: bool = True,
                  mode: str = "factorized", basis_dim: int = 16, code_dim: int = 128) -> dict[str, int]:
    """Weights of each part of ``Hypernetwork`` (its top-level parameter names) from shapes alone,
    so a size limit can be checked before anything is allocated (tested against the built module)."""
    n, r, k, d = len(layer_shapes), rank, basis_dim, code_dim
    fan_in, fan_out = sum(i for i, _ in layer_shapes.values()), sum(o for _, o in layer_shapes.values())
    counts = {"A": r * fan_in}
    if mode == "core":
        counts["U"] = fan_out * r
        if predict:
            counts["core"] = (hidden_dim + 1) * n * r * r
    elif mode == "full" and predict:
        counts.update(a_head=(hidden_dim + 1) * r * fan_in, b_head=(hidden_dim + 1) * r * fan_out)
    elif mode == "factorized" and predict:
        counts.update(V=k * fan_in, U=fan_out * k, code=(hidden_dim + 1) * d, maps=n * (d + 1) * 2 * r * k)
    return counts


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _LayerMaps(nn.Module):
    """One zero-initialised linear map per layer: code [N, d] -> [N, L, width]."""

    def __init__(self, layers: int, code_dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers, width, code_dim))
        self.bias = nn.Parameter(torch.zeros(layers, width))

    def forward(self, code: Tensor) -> Tensor:
        return torch.einsum("nd,lwd->nlw", code, self.weight) + self.bias  # [N, L, width]


class Hypernetwork(nn.Module):
    def __init__(self, layer_shapes: dict[str, tuple[int, int]], hidden_dim: int, rank: int,
                 predict: bool = True, seed: int = 0, mode: str = "factorized", basis_dim: int = 16,
                 code_dim: int = 128):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"hypernetwork mode must be one of {MODES}, got {mode!r}")
        self.names = list(layer_shapes)
        self.shapes = list(layer_shapes.values())
        self.rank = rank
        self.mode = mode
        self.basis_dim = basis_dim
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList(
            nn.Parameter(torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in))
            for fan_in, _ in layer_shapes.values()
        )
        self.core = self.a_head = self.b_head = self.code = self.maps = None
        if mode == "core":
            self.U = nn.ParameterList(
                nn.Parameter(torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank))
                for _, fan_out in layer_shapes.values()
            )
            self.core = _zero_linear(hidden_dim, len(self.names) * rank * rank) if predict else None
        elif mode == "full" and predict:
            # dA starts at 0 too: the first steps move B along the fixed basis A_l, as in core mode
            self.a_head = _zero_linear(hidden_dim, rank * sum(i for i, _ in self.shapes))
            self.b_head = _zero_linear(hidden_dim, rank * sum(o for _, o in self.shapes))
        elif mode == "factorized" and predict:
            k = basis_dim
            self.V = nn.ParameterList(
                nn.Parameter(torch.randn(k, fan_in, generator=gen) / math.sqrt(fan_in))
                for fan_in, _ in layer_shapes.values()
            )
            self.U = nn.ParameterList(
                nn.Parameter(torch.randn(fan_out, k, generator=gen) / math.sqrt(k))
                for _, fan_out in layer_shapes.values()
            )
            self.code = nn.Linear(hidden_dim, code_dim)
            self.maps = _LayerMaps(len(self.names), code_dim, 2 * rank * k)

    def forward(self, h: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """h: [N, hidden] -> {name: (A [N, r, in], B [N, out, r])}."""
        if self.mode == "full":
            return self._full(h)
        if self.mode == "factorized":
            return self._factorized(h)
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

    def _factorized(self, h: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        n, r, k = h.shape[0], self.rank, self.basis_dim
        if self.maps is None:
            return {name: (self.A[i].unsqueeze(0).expand(n, -1, -1), h.new_zeros(n, fan_out, r))
                    for i, (name, (_, fan_out)) in enumerate(zip(self.names, self.shapes))}
        coeffs = self.maps(self.code(h))  # [N, L, 2rk]
        p, q = coeffs.split(r * k, dim=-1)
        p, q = p.view(n, -1, r, k), q.view(n, -1, k, r)  # [N, L, r, k], [N, L, k, r]
        factors = {}
        for i, name in enumerate(self.names):
            A = self.A[i].unsqueeze(0) + p[:, i] @ self.V[i]  # [N, r, k] @ [k, in] -> [N, r, in]
            B = self.U[i] @ q[:, i]  # [out, k] @ [N, k, r] -> [N, out, r]
            factors[name] = (A, B)
        return factors
