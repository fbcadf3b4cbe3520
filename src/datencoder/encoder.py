"""The tuning encoder: fusion trunk, embedding head and hypernetwork (METHOD.md).

Features of the concept image (``features.py``) and a timestep embedding pass a small MLP
trunk; the embedding head predicts the word embedding of S*, the hypernetwork the per-sample
low-rank attention offsets. Only this module is trained; the feature paths stay frozen.
``check_head_size`` refuses, from the shapes alone, a hypernetwork past ``encoder.max_head_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .config import EncoderConfig
from .errors import DatencoderError
from .features import timestep_features
from .hypernetwork import TUNED_BY_HEADS, Hypernetwork, weight_counts

__all__ = ["TuningEncoder", "EncoderOutput", "check_head_size", "head_weight_counts", "HEAD_LIMIT_FLOOR"]

HEAD_LIMIT_FLOOR = 16_000_000
"""Hypernetworks up to this many weights (64 MB in fp32) pass ``encoder.max_head_fraction`` on any
base: on small bases (minisd-emoji's UNet has 12.7 M parameters) a fraction would refuse heads
that cost nothing."""


def _hypernet_args(cfg: EncoderConfig) -> dict:
    return dict(hidden_dim=cfg.hidden_dim, rank=cfg.rank, predict=cfg.use_hypernetwork, mode=cfg.hypernet_mode,
                basis_dim=cfg.basis_dim, code_dim=cfg.code_dim)


def head_weight_counts(cfg: EncoderConfig, layer_shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Weights of each part of the hypernetwork ``cfg`` builds for these layers (no allocation)."""
    return weight_counts(layer_shapes, **_hypernet_args(cfg))


def check_head_size(cfg: EncoderConfig, layer_shapes: dict[str, tuple[int, int]], unet_weights: int) -> int:
    """The hypernetwork's weight count; a one-line error when it passes the limit
    max(``cfg.max_head_fraction`` x ``unet_weights``, ``HEAD_LIMIT_FLOOR``)."""
    total = sum(head_weight_counts(cfg, layer_shapes).values())
    if cfg.max_head_fraction is None:
        return total
    limit = max(cfg.max_head_fraction * unet_weights, HEAD_LIMIT_FLOOR)
    if total > limit:
        raise DatencoderError(
            f"encoder.hypernet_mode={cfg.hypernet_mode} would build a hypernetwork of {total:,} weights, "
            f"{total / unet_weights:.1%} of the UNet's {unet_weights:,} (limit {int(limit):,}: "
            f"encoder.max_head_fraction={cfg.max_head_fraction}); use encoder.hypernet_mode=factorized, "
            "or set encoder.max_head_fraction=null to build it anyway")
    return total


@dataclass
class EncoderOutput:
    embedding: Tensor
    """[N, D] word embedding of S*."""
    factors: dict[str, tuple[Tensor, Tensor]]
    """{"<attention module>.<target>": (A [N, r, in], B [N, out, r])}."""


class TuningEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, feature_width: int, token_dim: int,
                 layer_shapes: dict[str, tuple[int, int]], init_embedding: Tensor | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.feature_width = feature_width
        self.token_dim = token_dim
        layers: list[nn.Module] = [nn.LayerNorm(feature_width + cfg.timestep_dim)]
        width = feature_width + cfg.timestep_dim
        for _ in range(cfg.trunk_layers):
            layers += [nn.Linear(width, cfg.hidden_dim), nn.SiLU()]
            width = cfg.hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.embedding_head = nn.Linear(cfg.hidden_dim, token_dim)
        with torch.no_grad():
            # start near the mean real-word embedding, in the editable region of the text space
            self.embedding_head.weight.mul_(0.1)
            if init_embedding is not None:
                self.embedding_head.bias.copy_(init_embedding)
        self.hypernetwork = Hypernetwork(layer_shapes, seed=seed, **_hypernet_args(cfg))

    def hidden(self, features: Tensor, timesteps: Tensor) -> Tensor:
        """The trunk's output h: [N, feature_width], [N] -> [N, hidden]."""
        t = timestep_features(timesteps, self.cfg.timestep_dim).to(features)
        return self.trunk(torch.cat([features, t], dim=-1))

    def heads(self, h: Tensor, params: dict[str, Tensor] | None = None) -> EncoderOutput:
        """Embedding head and hypernetwork on h; ``params`` (from ``tunable_heads``) replace the
        encoder's own tensors of those names, and every other weight is used detached, so tuning
        them (``tune.tune_heads``) leaves the shared encoder and its gradients untouched."""
        if params is None:
            return EncoderOutput(self.embedding_head(h), self.hypernetwork(h))
        out = []
        for prefix in ("embedding_head", "hypernetwork"):
            module = getattr(self, prefix)
            tensors = {n: params.get(f"{prefix}.{n}", p.detach()) for n, p in module.named_parameters()}
            out.append(functional_call(module, tensors, (h,)))
        return EncoderOutput(*out)

    def tunable_heads(self, embedding: bool = True, lora: bool = True) -> dict[str, Tensor]:
        """Trainable copies of what ``tune.tune_heads`` tunes: the embedding head and the
        hypernetwork's parts of ``hypernetwork.TUNED_BY_HEADS`` (not the whole encoder)."""
        parts = (("embedding_head",) if embedding else ()) + tuple(
            f"hypernetwork.{part}" for part in (TUNED_BY_HEADS[self.cfg.hypernet_mode] if lora else ()))
        return {name: p.detach().clone().requires_grad_() for name, p in self.named_parameters()
                if any(name.startswith(part + ".") for part in parts)}

    def forward(self, features: Tensor, timesteps: Tensor) -> EncoderOutput:
        """features: [N, feature_width]; timesteps: [N] -> embedding and factors per sample."""
        return self.heads(self.hidden(features, timesteps))
