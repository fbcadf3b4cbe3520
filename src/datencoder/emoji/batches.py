"""Batches of emoji images for the small auxiliary models (image tower, evaluator).

Two sources of examples:

* ``load_rows_uint8``: the composed images of the data set, as one uint8 tensor.
* ``SourceBank``: fresh compositions drawn on the fly from the clean RGBA sources, pasted with
  exactly the data set's rules (``datencoder.emoji.data``: sizes, margins, placement, colours).
  Every draw is a new (size, position, background) example with exact labels, which is what
  a classifier that must recognise ~1,850 concepts from four renders each needs.

``augment`` adds the light photometric and geometric noise that keeps the models from keying on
pixel-exact composites (generated images are softer and noisier than the renders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from .data import BACKGROUNDS, POSITIONS, SIZES, _alpha_bbox, fit_square, placement
from ..config import check_range
from ..errors import DatencoderError
from ..io import save_file_atomic

__all__ = ["read_rows", "read_concepts", "load_rows_uint8", "SourceBank", "AugmentConfig", "augment",
           "composition_index"]


def read_rows(root: str | Path, splits: list[str] | None = None) -> list[dict]:
    """Manifest rows, optionally only those whose split is in ``splits``."""
    path = Path(root) / "manifest.jsonl"
    if not path.exists():
        raise DatencoderError(f"no manifest at {path}; build the data set with 'datencoder data' first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if splits is None or r["split"] in splits]


def read_concepts(root: str | Path, rows: list[dict]) -> list[dict]:
    """concepts.jsonl when present, else the distinct concepts of ``rows`` (key, name)."""
    path = Path(root) / "concepts.jsonl"
    if path.exists():
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [{"key": c.get("key", c.get("concept")), "name": c["name"]} for c in out]
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["concept"], r["name"])
    return [{"key": k, "name": v} for k, v in seen.items()]


def composition_index(row: dict) -> int:
    """images/noto/1f34e_3.png -> 3 (the index of the composition within its concept-style)."""
    return int(Path(row["file"]).stem.rsplit("_", 1)[1])


def load_rows_uint8(root: str | Path, rows: list[dict], size: int = 64) -> torch.Tensor:
    """[N, 3, size, size] uint8 images of the rows (4x smaller than float in memory)."""
    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    for i, row in enumerate(tqdm(rows, desc="load images", mininterval=10)):
        img = Image.open(Path(root) / row["file"]).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


class SourceBank:
    """Clean RGBA sources, pre-fitted at every size, composited on demand in torch.

    ``sources[i]`` is (concept key, style). Fitting (crop to visible pixels, Lanczos resize)
    is the slow part of ``data.emoji.compose`` and depends only on (source, size), so it runs
    once here; pasting onto a plain colour at a named position is a cheap slice per sample.
    """

    def __init__(self, root: str | Path, sources: list[tuple[str, str]], cache: str | Path | None = None) -> None:
        self.sources = sources
        self.sizes = list(SIZES)
        self.positions = list(POSITIONS)
        self.backgrounds = list(BACKGROUNDS)
        self.colours = torch.tensor([BACKGROUNDS[b] for b in self.backgrounds], dtype=torch.float32) / 255.0
        key = json.dumps([str(root), sources, SIZES])
        if cache is not None and Path(cache).exists():
            with safe_open(str(cache), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    self.crops, self.extent = f.get_tensor("crops"), f.get_tensor("extent")
                    return
        self._fit(root)
        if cache is not None:
            save_file_atomic(cache, {"crops": self.crops, "extent": self.extent}, metadata={"key": key})

    def _fit(self, root: str | Path) -> None:
        sources = self.sources
        side = max(SIZES.values())
        # [N, num_sizes, 4, side, side] straight (not premultiplied) RGBA, top-left aligned
        self.crops = torch.zeros(len(sources), len(self.sizes), 4, side, side, dtype=torch.uint8)
        self.extent = torch.zeros(len(sources), len(self.sizes), 2, dtype=torch.long)  # (w, h)
        for i, (key, style) in enumerate(tqdm(sources, desc="fit sources", mininterval=10)):
            path = Path(root) / "sources" / style / f"{key}.png"
            if not path.exists():
                raise DatencoderError(f"missing source image {path}; rebuild the data set")
            source = Image.open(path).convert("RGBA")
            for j, name in enumerate(self.sizes):
                emoji = fit_square(source, SIZES[name])
                emoji = emoji.crop(_alpha_bbox(emoji) or (0, 0, SIZES[name], SIZES[name]))
                arr = torch.from_numpy(np.asarray(emoji, dtype=np.uint8).copy()).permute(2, 0, 1)
                self.crops[i, j, :, : emoji.height, : emoji.width] = arr
                self.extent[i, j] = torch.tensor([emoji.width, emoji.height])

    def __len__(self) -> int:
        return len(self.sources)

    def compose(self, idx: torch.Tensor, size: torch.Tensor, position: torch.Tensor,
                background: torch.Tensor, canvas: int = 64) -> torch.Tensor:
        """[B] indices -> [B, 3, canvas, canvas] float in [-1, 1], as ``data.emoji.compose`` paints."""
        out = self.colours[background].view(-1, 3, 1, 1).expand(-1, 3, canvas, canvas).clone()
        for b in range(len(idx)):
            i, j = int(idx[b]), int(size[b])
            w, h = (int(v) for v in self.extent[i, j])
            x, y = placement((w, h), self.positions[int(position[b])], canvas)
            crop = self.crops[i, j, :, :h, :w].float() / 255.0  # [4, h, w]
            alpha = crop[3:]
            region = out[b, :, y : y + h, x : x + w]
            out[b, :, y : y + h, x : x + w] = crop[:3] * alpha + region * (1 - alpha)
        return out * 2.0 - 1.0

    def random(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A fresh random composition of each source in ``idx`` and its labels."""
        n = len(idx)
        labels = {
            "size": torch.randint(len(self.sizes), (n,), generator=generator),
            "position": torch.randint(len(self.positions), (n,), generator=generator),
            "background": torch.randint(len(self.backgrounds), (n,), generator=generator),
        }
        return self.compose(idx, labels["size"], labels["position"], labels["background"]), labels


@dataclass
class AugmentConfig:
    shift: float = 2.0
    """Maximum translation in pixels (small enough not to change the position label)."""
    scale: float = 0.04
    """Maximum relative zoom in or out."""
    brightness: float = 0.08
    contrast: float = 0.08
    blur_prob: float = 0.3
    """Chance of a down-and-up resample that softens edges like a VAE decode."""
    noise_std: float = 0.03
    """Maximum std of additive Gaussian noise (images in [-1, 1])."""

    def __post_init__(self) -> None:
        check_range(self, "augment", ">= 0", "shift", "brightness", "contrast", "noise_std")
        check_range(self, "augment", "in [0, 1)", "scale")
        check_range(self, "augment", "in [0, 1]", "blur_prob")


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random jitter of a [B, 3, H, W] batch in [-1, 1]; each sample gets its own draw."""
    b, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731  uniform(-1, 1)
    zoom = 1 + cfg.scale * u(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, 0, 2] = cfg.shift * u(b) * 2 / w  # affine_grid works in [-1, 1] coordinates
    theta[:, 1, 2] = cfg.shift * u(b) * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Border padding repeats the plain background, so shifts never introduce a foreign colour.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    blur = torch.rand(b, generator=generator) < cfg.blur_prob
    if blur.any():
        soft = F.interpolate(F.interpolate(x[blur], scale_factor=0.5, mode="area"), size=(h, w), mode="bilinear",
                             align_corners=False)
        x = x.clone()
        x[blur] = soft
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + cfg.contrast * u(b, 1, 1, 1)) + mean + cfg.brightness * u(b, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * cfg.noise_std * torch.rand(b, 1, 1, 1, generator=generator)
    return x.clamp(-1, 1)
