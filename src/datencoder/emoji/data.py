"""Pure pieces of the emoji data set: keys, splits, compositions and captions.

Nothing here touches the network, npm or apt, so the tests exercise it offline on fixture
images. Source discovery and rendering live in :mod:`datencoder.emoji.sources`, the
build pipeline in :mod:`datencoder.emoji.build`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "STYLES", "SIZES", "POSITIONS", "BACKGROUNDS", "Concept", "Composition",
    "normalize_key", "key_from_text", "select_heldout", "split_for", "fit_square",
    "dominant_colour", "sample_compositions", "compose", "make_caption",
]

STYLES = ("noto", "twemoji", "openmoji", "fluent3d")
# Words used for the style in captions (the manifest keeps the short style id).
STYLE_WORDS = {"noto": "noto", "twemoji": "twemoji", "openmoji": "openmoji",
               "fluent3d": "fluent 3d"}
HELDOUT_STYLE = "fluent3d"
CANVAS = 64
MARGIN = 2  # pixels kept free at the frame edge so "left" never touches the border
SIZES = {"small": 24, "medium": 36, "large": 52}
POSITIONS = ("center", "left", "right", "top", "bottom",
             "top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {
    "white": (255, 255, 255), "red": (215, 38, 38), "orange": (245, 140, 25),
    "yellow": (250, 218, 45), "green": (56, 168, 72), "blue": (45, 95, 215),
    "purple": (135, 65, 190), "pink": (245, 135, 195), "gray": (128, 128, 128),
}
# Extra reference colours used only to classify an emoji's dominant colour, so a brown or
# black emoji is not mislabelled as "orange" or "gray" and needlessly excludes that background.
_REFERENCE_ONLY = {"black": (25, 25, 25), "brown": (125, 78, 40), "skin": (250, 200, 150)}
EMPTY_CAPTION_P = 0.1
_KEEP_P = {"name": 0.9, "style": 0.6, "size": 0.6, "position": 0.6, "background": 0.6}
_DROPPED_PARTS = {"fe0f", "200d"}  # variation selector and zero-width joiner


@dataclass(frozen=True)
class Concept:
    key: str
    emoji: str
    name: str
    category: str
    subcategory: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Composition:
    size: str
    position: str
    background: str
    caption: str


def normalize_key(sequence: str) -> str:
    """'0023-FE0F-20E3' -> '23-20e3': lowercase hex, no leading zeros, no FE0F/ZWJ."""
    parts = sequence.strip().lower().replace("_", "-").replace(" ", "-").split("-")
    parts = [p.lstrip("0") or "0" for p in parts if p]
    return "-".join(p for p in parts if p not in _DROPPED_PARTS)


def key_from_text(text: str) -> str:
    return normalize_key("-".join(f"{ord(c):x}" for c in text))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def select_heldout(concepts: list[Concept], fraction: float = 0.1) -> set[str]:
    """Held-out concept keys: ``fraction`` of every category, by a fixed hash of the key.

    Independent of the build seed and of --limit, so every build of the data set (and every
    model trained on it) agrees on which concepts were never seen in training.
    """
    by_category: dict[str, list[str]] = {}
    for c in concepts:
        by_category.setdefault(c.category, []).append(c.key)
    heldout: set[str] = set()
    for keys in by_category.values():
        n = max(1, round(fraction * len(keys)))
        heldout.update(sorted(keys, key=lambda k: _stable_int("heldout:" + k))[:n])
    return heldout


def split_for(heldout_concept: bool, style: str) -> str:
    if heldout_concept:
        return "heldout_concept"
    return "heldout_style" if style == HELDOUT_STYLE else "train"


def _alpha_bbox(image: Image.Image, threshold: int = 8) -> tuple[int, int, int, int] | None:
    # A faint anti-aliasing halo would otherwise inflate the box and shrink the emoji.
    return image.getchannel("A").point(lambda a: 255 if a > threshold else 0).getbbox()


def fit_square(image: Image.Image, side: int = CANVAS) -> Image.Image:
    """Crop an RGBA image to its visible pixels and fit it centred in a transparent square."""
    image = image.convert("RGBA")
    bbox = _alpha_bbox(image)
    if bbox is None:
        raise ValueError("image has no visible pixels")
    image = image.crop(bbox)
    scale = side / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = image.resize((w, h), Image.LANCZOS)
    out = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    out.alpha_composite(image, ((side - w) // 2, (side - h) // 2))
    return out


def dominant_colour(image: Image.Image) -> str:
    """Name of the reference colour nearest to most opaque pixels of an RGBA image."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32).reshape(-1, 4)
    rgb = rgba[rgba[:, 3] > 128, :3]
    if len(rgb) == 0:
        return "white"
    names = list(BACKGROUNDS) + list(_REFERENCE_ONLY)
    refs = np.array([BACKGROUNDS.get(n) or _REFERENCE_ONLY[n] for n in names], dtype=np.float32)
    nearest = ((rgb[:, None, :] - refs[None]) ** 2).sum(-1).argmin(1)  # (pixels,)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(rng: np.random.Generator, name: str, style: str, size: str,
                 position: str, background: str) -> str:
    """Caption with randomly dropped parts; empty with probability ``EMPTY_CAPTION_P``."""
    if rng.random() < EMPTY_CAPTION_P:
        return ""
    parts = {"name": name, "style": f"{STYLE_WORDS[style]} style", "size": size,
             "position": position,
             "background": f"on {_article(background)} {background} background"}
    keep = [k for k in parts if rng.random() < _KEEP_P[k]]
    return ", ".join(parts[k] for k in keep or ["name"])


def sample_compositions(seed: int, key: str, style: str, name: str, k: int,
                        dominant: str | None = None) -> list[Composition]:
    """K compositions of one (concept, style); depends only on its arguments, not on order."""
    rng = np.random.default_rng([seed, _stable_int(key) % 2**32, STYLES.index(style)])
    backgrounds = [b for b in BACKGROUNDS if b != dominant]
    out = []
    for _ in range(k):
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        background = backgrounds[rng.integers(len(backgrounds))]
        caption = make_caption(rng, name, style, size, position, background)
        out.append(Composition(size, position, background, caption))
    return out


def placement(size: tuple[int, int], position: str, canvas: int = CANVAS,
              margin: int = MARGIN) -> tuple[int, int]:
    """Top-left corner for an emoji of ``size`` (w, h) at a named position inside the frame."""
    w, h = size
    x = {"left": margin, "right": canvas - w - margin}.get(
        next((p for p in ("left", "right") if p in position), ""), (canvas - w) // 2)
    y = {"top": margin, "bottom": canvas - h - margin}.get(
        next((p for p in ("top", "bottom") if p in position), ""), (canvas - h) // 2)
    return x, y


def compose(source: Image.Image, size: str, position: str, background: str,
            canvas: int = CANVAS) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Paste an RGBA emoji, its longer side ``SIZES[size]`` px, on a plain background.

    Returns the RGB image and the box (x0, y0, x1, y1) the emoji was pasted into.
    """
    side = SIZES[size]
    emoji = fit_square(source, side)
    emoji = emoji.crop(_alpha_bbox(emoji) or (0, 0, side, side))
    x, y = placement(emoji.size, position, canvas)
    out = Image.new("RGBA", (canvas, canvas), BACKGROUNDS[background] + (255,))
    out.alpha_composite(emoji, (x, y))
    return out.convert("RGB"), (x, y, x + emoji.width, y + emoji.height)
