"""The concept artifact: everything generation needs, and nothing of the encoder.

A concept folder holds ``concept.safetensors`` (the embedding of S* — with two text encoders
(SDXL) one tensor per encoder, ``embedding`` and ``embedding_2`` — and the low-rank factors of
one concept) and ``concept.json`` (placeholder, token, the nearest real word used by the hard
path, blend weights, base-model identity and the resolved config it was made with).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .io import (artifact_dir, atomic_dir, check_base, check_finite, check_replaceable, file_sha256, load_tensors,
                 read_json, save_tensors_atomic, tensors_sha256, write_json_atomic)
from .errors import DatencoderError

__all__ = ["Concept"]

KIND = "concept"
FILES = (f"{KIND}.json", f"{KIND}.safetensors")
_FIX = "re-create the concept with 'datencoder personalize'"


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
    source: str = field(default="", compare=False, repr=False)
    """The folder it was loaded from (named in error messages); empty when made in memory."""

    def __post_init__(self):
        self.token_dims = tuple(int(d) for d in self.token_dims) or (int(self.embedding.shape[-1]),)
        if sum(self.token_dims) != self.embedding.shape[-1]:
            raise DatencoderError(f"concept embedding of width {self.embedding.shape[-1]} does not split "
                                  f"into text-encoder widths {list(self.token_dims)}")

    def check_fits(self, base) -> None:
        """Refuse, in one line, a concept whose tensors do not fit ``base`` (made for it, but edited):
        each text encoder's embedding width and each factor's shape against its attention layer."""
        where = f"concept {self.source}" if self.source else "the concept"
        check_base(where, self.base, base)
        if tuple(self.token_dims) != tuple(base.token_dims):
            raise DatencoderError(f"{where}: its embedding has width {'+'.join(map(str, self.token_dims))}, the "
                                  f"base's text encoder takes {'+'.join(map(str, base.token_dims))}; {_FIX}")
        from .attention import target_layer_shapes

        layers = target_layer_shapes(base.unet)  # {name: (in, out)} of every projection offsets can target
        for name, (A, B) in self.factors.items():
            if name not in layers:
                raise DatencoderError(f"{where}: factor {name} names no attention projection of the base; {_FIX}")
            if (A.shape[1], B.shape[0]) != layers[name]:
                raise DatencoderError(f"{where}: factors of {name} map {A.shape[1]} -> {B.shape[0]}, the layer "
                                      f"maps {layers[name][0]} -> {layers[name][1]}; {_FIX}")

    def embedding_parts(self) -> list[Tensor]:
        """One [D_k] vector per text encoder."""
        return list(self.embedding.split(list(self.token_dims)))

    def batched_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Factors with a leading sample dimension of 1, as the attention processors expect."""
        return {k: (A.unsqueeze(0), B.unsqueeze(0)) for k, (A, B) in self.factors.items()}

    def save(self, directory: str | Path) -> Path:
        """Write the concept folder whole: both files go into a new folder that replaces
        ``directory`` in one swap (``io.atomic_dir``), so a kill leaves the old concept or the new
        one, never a mix. A folder holding other files is refused (it would be replaced)."""
        directory = Path(directory)
        check_replaceable(directory, FILES, KIND)
        parts = self.embedding_parts()
        tensors = {_embedding_key(k): part.contiguous() for k, part in enumerate(parts)}
        for name, (A, B) in self.factors.items():
            tensors[f"lora_A.{name}"] = A
            tensors[f"lora_B.{name}"] = B
        for name in ("blend_self", "blend_cross", "scale"):
            if not math.isfinite(getattr(self, name)):
                raise DatencoderError(f"refusing to write a concept with {name} = {getattr(self, name)}")
        check_finite(tensors, f"refusing to write the concept {directory}", "nothing non-finite is saved")
        with atomic_dir(directory) as tmp:
            save_tensors_atomic(tmp / f"{KIND}.safetensors", tensors, KIND)
            # the tensors' hash in the JSON also tells a pair copied together from two saves apart
            write_json_atomic(tmp / f"{KIND}.json", {
                "kind": KIND,
                "tensors_sha256": tensors_sha256(tensors),
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
        """Load a concept, checking its JSON against its tensors; with ``base`` given, refuse one
        made for another base model (or not fitting it). Every problem is one line naming the folder."""
        directory = artifact_dir(directory)
        if not directory.is_dir():
            raise DatencoderError(f"concept folder {directory} not found; create it with 'datencoder personalize'")
        meta = read_json(directory / f"{KIND}.json", KIND)
        tensors = load_tensors(directory / f"{KIND}.safetensors", KIND)
        recorded = meta.get("tensors_sha256")  # absent in concepts saved before it was recorded
        # concepts saved before the content hash recorded the file's hash: either pairs them
        if recorded is not None and recorded != tensors_sha256(tensors) \
                and recorded != file_sha256(directory / f"{KIND}.safetensors"):
            raise DatencoderError(f"{directory}: {KIND}.json and {KIND}.safetensors come from different saves "
                                  f"(tensor fingerprint mismatch); {_FIX}")
        if "embedding" not in tensors:
            raise DatencoderError(f"{directory} holds no embedding; {_FIX}")
        parts = []
        while _embedding_key(len(parts)) in tensors:
            parts.append(tensors[_embedding_key(len(parts))])
        concept = cls(
            embedding=torch.cat(parts), token_dims=tuple(len(p) for p in parts),
            factors=_factors(directory, tensors), **_fields(directory, meta), source=str(directory),
        )
        if base is not None:
            concept.check_fits(base)
        return concept


def _factors(directory: Path, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (A [r, in], B [out, r])} from the lora_A./lora_B. tensors, each checked for its pair and shape."""
    names = {k.split(".", 1)[1] for k in tensors if k.startswith(("lora_A.", "lora_B."))}
    factors = {}
    for name in sorted(names):
        A, B = tensors.get(f"lora_A.{name}"), tensors.get(f"lora_B.{name}")
        if A is None or B is None:
            raise DatencoderError(f"{directory / f'{KIND}.safetensors'} lacks lora_{'A' if A is None else 'B'}.{name} "
                                  f"(its pair is there); {_FIX}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise DatencoderError(f"{directory / f'{KIND}.safetensors'}: factors of {name} have shapes "
                                  f"{list(A.shape)} and {list(B.shape)}, not [r, in] and [out, r]; {_FIX}")
        factors[name] = (A, B)
    return factors


def _fields(directory: Path, meta: dict) -> dict:
    """The concept's scalar fields from concept.json, each checked for its type (and finiteness)."""
    path = directory / f"{KIND}.json"
    out = {}
    for key in ("hard_word", "placeholder", "token"):
        value = meta.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "is missing" if key not in meta else f"is {value!r}, not a word"
            raise DatencoderError(f"{path}: '{key}' {got}; {_FIX}")
        out[key] = value
    for key in ("blend_self", "blend_cross", "scale"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            got = "is missing" if key not in meta else f"is {value!r}, not a finite number"
            raise DatencoderError(f"{path}: '{key}' {got}; {_FIX}")
        out[key] = float(value)
    for key in ("blend_self", "blend_cross"):
        if not 0 <= out[key] <= 1:
            raise DatencoderError(f"{path}: '{key}' is {out[key]}, outside [0, 1]; {_FIX}")
    pooled = meta.get("pooled", "soft")  # saved before the choice existed: the soft prompt's
    if pooled not in ("soft", "hard", "blend"):
        raise DatencoderError(f"{path}: 'pooled' is {pooled!r}, not soft, hard or blend; {_FIX}")
    out["pooled"] = pooled
    for key in ("base", "config", "info"):
        value = meta.get(key, {})
        if not isinstance(value, dict):
            raise DatencoderError(f"{path}: '{key}' is {type(value).__name__}, not a mapping; {_FIX}")
        out[key] = value
    return out
