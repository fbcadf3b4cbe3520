"""Images from users, validated: one RGB picture in, one-line errors naming the file and the fix.

The method personalises from ONE image, so whatever the user hands over (a PNG with transparency,
a 16-bit scan, a rotated phone photo, an animated GIF) must become a sensible RGB picture, and
everything else must fail early with a message the user can act on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import DatencoderError
from .io import to_pixels, write_atomic

__all__ = ["load_image", "image_to_tensor", "image_format", "save_image_atomic", "make_grid"]

log = logging.getLogger(__name__)

_FORMATS_HINT = "pass a PNG, JPEG or WebP image"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def _to_8bit(array: np.ndarray, mode: str) -> np.ndarray:
    """Map integer / float single-channel pixels onto 0..255."""
    array = array.astype(np.float64)
    if mode.startswith("I;16"):
        array = array / 257.0  # 65535 -> 255 exactly
    elif mode == "F" and array.size and np.nanmax(array) <= 1.0:
        array = array * 255.0  # float images conventionally hold 0..1
    elif array.size and np.nanmax(array) > 255:
        array = array / 257.0  # 32-bit "I" images are 16-bit data in practice (PNG greyscale)
    return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_to_8bit(np.array(image), mode))
        return grey.convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, *, min_size: int = 32, max_pixels: int | None = None,
               warn: bool = False) -> Image.Image:
    """Open ``path`` as an RGB image (first frame, EXIF orientation applied, at least ``min_size``).

    ``warn``: log a line when only part of the file is used: the first of several frames, or (by
    ``image_to_tensor``, later) the centre square of a non-square image.

    ``max_pixels`` refuses larger images from the header alone, before any pixel is decoded (a
    server must not decode a 100-megapixel upload to find out it is too large).
    """
    path = Path(path)
    if not path.exists():
        raise DatencoderError(f"image not found: {path}; check the path")
    if path.is_dir():
        raise DatencoderError(f"{path} is a directory; {_FORMATS_HINT} file")
    try:
        with Image.open(path) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise DatencoderError(f"{path} is {opened.width}x{opened.height} pixels, more than the limit of "
                                     f"{max_pixels / 1e6:.1f} megapixels; use a smaller image")
            frames = getattr(opened, "n_frames", 1)
            if frames > 1 and warn:
                log.warning("%s has %d frames; using the first", path, frames)
            opened.seek(0)  # animated images: the first frame
            opened.load()
            try:
                image = ImageOps.exif_transpose(opened)
            except (ValueError, TypeError, SyntaxError, KeyError):
                log.warning("ignoring unreadable EXIF orientation in %s", path)
                image = opened.copy()
            image = _to_rgb(image)
    except DatencoderError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatencoderError(f"{path} is not a readable image ({reason}); {_FORMATS_HINT}") from err
    width, height = image.size
    if min(width, height) < min_size:
        raise DatencoderError(
            f"{path} is {width}x{height} pixels; personalisation needs at least {min_size}x{min_size}"
            "; use a larger image"
        )
    if warn and width != height:
        side = min(width, height)
        log.warning("%s is %dx%d; using its centre %dx%d square", path, width, height, side, side)
    return image


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize (bicubic) to ``size``: float32 [3, size, size] in [-1, 1]."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first: resize(box=...) would let the filter read pixels outside the crop.
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return to_pixels(square)  # [3, H, W] in [-1, 1]


def image_format(path: str | Path, option: str = "cannot save") -> str:
    """PIL's format name for the extension of ``path``; a missing or unknown one is a one-line error."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DatencoderError(f"{option} {path}: unknown image extension; use .png, .jpg or .webp")
    return fmt


def save_image_atomic(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` to ``path`` atomically (``io.write_atomic``)."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = _to_rgb(image)
    write_atomic(path, lambda tmp: image.save(tmp, format=fmt))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten ``text`` with '...' until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None,
              pad: int = 2) -> Image.Image:
    """Tile ``images`` row-major on white, ``cols`` per row, with optional small labels under each."""
    if not images:
        raise DatencoderError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise DatencoderError(f"make_grid got {len(labels)} labels for {len(images)} images")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    tile_w = max(im.width for im in images)
    tile_h = max(im.height for im in images)
    font = ImageFont.load_default()
    label_h = 0
    if labels is not None:
        top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
        label_h = bottom - min(top, 0) + pad
    cell_h = tile_h + label_h
    grid = Image.new("RGB", (cols * tile_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), _WHITE)
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        x = pad + col * (tile_w + pad)
        y = pad + row * (cell_h + pad)
        # Smaller tiles are centred in their cell.
        grid.paste(_to_rgb(image), (x + (tile_w - image.width) // 2, y + (tile_h - image.height) // 2))
        if labels is not None:
            text = _fit(draw, str(labels[index]), font, tile_w)
            draw.text((x, y + tile_h + pad // 2), text, fill=(0, 0, 0), font=font)
    return grid
