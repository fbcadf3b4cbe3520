"""The concept artifact: everything generation needs, and nothing of the encoder.

A concept folder holds ``concept.safetensors`` (the embedding of S* — with two text encoders
(SDXL) one tensor per encoder, ``embedding`` and ``embedding_2`` — and the low-rank factors of
one concept) and ``concept.json`` (placeholder, token, the nearest real word used by the hard
path, blend weights, base-model identity and the resolved config it was made with).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .io import check_base, file_sha256, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from .errors import DatencoderError

__all__ = ["Concept"]

KIND = "concept"


def _embedding_key(k: int) -> str:
    return "embedding" if k == 0 else f"embedding_{k + 1}"  # embedding, embedding_2 (as text_encoder_2)


@dataclass
class Concept:
    embedding: Tensor
    """[D] word embedding of S* (SDXL: the two encoders' vectors concatenated, D = D1 + D2)."""
    factors: dict[str, tuple[Tensor, Tensor]]
    """{"<attention module>.<target>": (A [r, in], B [out, r])}."""
    hard_word: str
    placeholder: str = "S*"
    token: str = "<concept>"
    blend_self: float = 0.5
    blend_cross: float = 0.5
    pooled: str = "hard"
    """SDXL: the time embedding's pooled text under the dual path (``dual_path.pooled``)."""
    scale: float = 1.0
    base: dict = field(default_factory=dict)
    """{"name": ..., "fingerprint": ...} of the base model."""
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    """Free-form provenance: source image, steps, timings."""
    token_dims: tuple[int, ...] = ()
    """Width of each text encoder's part of ``embedding``; empty means one encoder."""

    def __post_init__(self):
        self.token_dims = tuple(int(d) for d in self.token_dims) or (int(self.embedding.shape[-1]),)
        if sum(self.token_dims) != self.embedding.shape[-1]:
            raise DatencoderError(f"concept embedding of width {self.embedding.shape[-1]} does not split "
                                  f"into text-encoder widths {list(self.token_dims)}")

    def embedding_parts(self) -> list[Tensor]:
        """One [D_k] vector per text encoder."""
        return list(self.embedding.split(list(self.token_dims)))

    def batched_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Factors with a leading sample dimension of 1, as the attention processors expect."""
        return {k: (A.unsqueeze(0), B.unsqueeze(0)) for k, (A, B) in self.factors.items()}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        parts = self.embedding_parts()
        tensors = {_embedding_key(k): part.contiguous() for k, part in enumerate(parts)}
        for name, (A, B) in self.factors.items():
            tensors[f"lora_A.{name}"] = A
            tensors[f"lora_B.{name}"] = B
        save_tensors_atomic(directory / f"{KIND}.safetensors", tensors, KIND)
        # The two files are renamed into place one after the other; the tensors' hash in the JSON
        # lets a load tell a mixed pair (a kill between the renames, files copied apart) from a concept.
        write_json_atomic(directory / f"{KIND}.json", {
            "kind": KIND,
            "tensors_sha256": file_sha256(directory / f"{KIND}.safetensors"),
            "placeholder": self.placeholder,
            "token": self.token,
            "hard_word": self.hard_word,
            "blend_self": self.blend_self,
            "blend_cross": self.blend_cross,
            "pooled": self.pooled,
            "scale": self.scale,
            "base": self.base,
            "config": self.config,
            "info": self.info,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path, base=None) -> "Concept":
        """Load a concept; with ``base`` given, refuse one made for another base model."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DatencoderError(f"concept folder {directory} not found; create it with 'datencoder personalize'")
        meta = read_json(directory / f"{KIND}.json", KIND)
        tensors = load_tensors(directory / f"{KIND}.safetensors", KIND)
        recorded = meta.get("tensors_sha256")  # absent in concepts saved before it was recorded
        if recorded is not None and recorded != file_sha256(directory / f"{KIND}.safetensors"):
            raise DatencoderError(f"{directory}: {KIND}.json and {KIND}.safetensors come from different saves "
                                  "(tensor fingerprint mismatch); re-create the concept with 'datencoder personalize'")
        if "embedding" not in tensors:
            raise DatencoderError(f"{directory} holds no embedding; re-create the concept")
        parts = []
        while _embedding_key(len(parts)) in tensors:
            parts.append(tensors[_embedding_key(len(parts))])
        factors = {}
        for key in tensors:
            if key.startswith("lora_A."):
                name = key[len("lora_A."):]
                factors[name] = (tensors[key], tensors[f"lora_B.{name}"])
        if base is not None:
            check_base(f"concept {directory}", meta.get("base", {}), base)
        return cls(
            embedding=torch.cat(parts), token_dims=tuple(len(p) for p in parts), factors=factors,
            hard_word=meta["hard_word"],
            placeholder=meta["placeholder"], token=meta["token"], blend_self=meta["blend_self"],
            blend_cross=meta["blend_cross"], scale=meta["scale"], base=meta.get("base", {}),
            pooled=meta.get("pooled", "soft"),  # saved before the choice existed: the soft prompt's
            config=meta.get("config", {}), info=meta.get("info", {}),
        )
