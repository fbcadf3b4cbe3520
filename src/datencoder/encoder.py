"""The tuning encoder: fusion trunk, embedding head and hypernetwork (METHOD.md).

Features of the concept image (``features.py``) and a timestep embedding pass a small MLP
trunk; the embedding head predicts the word embedding of S*, the hypernetwork the per-sample
low-rank attention offsets. Only this module is trained; the feature paths stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import EncoderConfig
from .features import timestep_features
from .hypernetwork import Hypernetwork

__all__ = ["TuningEncoder", "EncoderOutput"]


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
        self.hypernetwork = Hypernetwork(layer_shapes, cfg.hidden_dim, cfg.rank, predict=cfg.use_hypernetwork,
                                         mode=cfg.hypernet_mode, seed=seed)

    def hidden(self, features: Tensor, timesteps: Tensor) -> Tensor:
        """The trunk's output h: [N, feature_width], [N] -> [N, hidden]."""
        t = timestep_features(timesteps, self.cfg.timestep_dim).to(features)
        return self.trunk(torch.cat([features, t], dim=-1))

    def heads(self, h: Tensor) -> EncoderOutput:
        """Embedding head and hypernetwork on h (tuning may tune these alone: ``tune.tune_heads``)."""
        return EncoderOutput(self.embedding_head(h), self.hypernetwork(h))

    def forward(self, features: Tensor, timesteps: Tensor) -> EncoderOutput:
        """features: [N, feature_width]; timesteps: [N] -> embedding and factors per sample."""
        return self.heads(self.hidden(features, timesteps))
