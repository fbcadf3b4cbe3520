"""User images: every bad input is a one-line DatencoderError; every mode becomes sensible RGB."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder.errors import DatencoderError
from datencoder.image_io import image_to_tensor, load_image, make_grid, save_image_atomic

SIZE = (40, 40)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _pixel(image, xy=(20, 20)):
    return image.convert("RGB").getpixel(xy) if image.mode != "RGB" else image.getpixel(xy)


# --- bad inputs ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DatencoderError, match=r"image not found: .*nope\.png; check the path"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(DatencoderError, match=r"is a directory; pass a PNG, JPEG or WebP image file"):
        load_image(tmp_path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(DatencoderError, match=r"notes\.png is not a readable image \(.*\); pass a PNG"):
        load_image(path)


def test_truncated_png(tmp_path):
    path = _save(Image.effect_noise(SIZE, 64).convert("RGB"), tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatencoderError, match=r"cut\.png is not a readable image"):
        load_image(path)


def test_too_small(tmp_path):
    path = _save(Image.new("RGB", (12, 12)), tmp_path / "small.png")
    with pytest.raises(DatencoderError, match=r"small\.png is 12x12 pixels; personalisation needs at least 32x32"):
        load_image(path)
    assert load_image(path, min_size=8).size == (12, 12)


def test_too_many_pixels_refused_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    path.write_bytes(path.read_bytes()[:100])  # header intact, pixels gone: only the header is read
    with pytest.raises(DatencoderError, match=r"big\.png is 300x200 pixels, more than the limit of 0\.1 megapixels"):
        load_image(path, max_pixels=50_000)
    with pytest.raises(DatencoderError, match=r"big\.png is not a readable image"):
        load_image(path, max_pixels=60_000)


@pytest.mark.parametrize("case", ["missing", "text"])
def test_errors_are_one_line(tmp_path, case):
    path = tmp_path / "x.jpg"
    if case == "text":
        path.write_text("line one\nline two\n")
    with pytest.raises(DatencoderError) as info:
        load_image(path)
    assert "\n" not in str(info.value)


# --- modes --------------------------------------------------------------------------------------

def test_transparent_rgba_and_la_become_white(tmp_path):
    rgba = Image.new("RGBA", SIZE, (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 40))  # opaque left half
    out = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 0, 0) and out.getpixel((30, 5)) == (255, 255, 255)
    half = load_image(_save(Image.new("RGBA", SIZE, (0, 0, 0, 128)), tmp_path / "half.png"))
    assert all(abs(c - 127) <= 1 for c in half.getpixel((5, 5)))  # 50% black over white
    la = load_image(_save(Image.new("LA", SIZE, (0, 0)), tmp_path / "la.png"))
    assert la.getpixel((5, 5)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", SIZE, 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 20, 40))
    out = load_image(_save(pal, tmp_path / "p.png", transparency=0))
    assert out.getpixel((5, 5)) == (0, 255, 0) and out.getpixel((30, 5)) == (255, 255, 255)
    opaque = load_image(_save(pal, tmp_path / "p2.png"))
    assert opaque.getpixel((30, 5)) == (0, 0, 0)


def test_grey_and_bilevel(tmp_path):
    assert load_image(_save(Image.new("L", SIZE, 77), tmp_path / "l.png")).getpixel((1, 1)) == (77, 77, 77)
    assert load_image(_save(Image.new("1", SIZE, 1), tmp_path / "b.png")).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grey_scales_to_eight_bit(tmp_path):
    array = np.full((40, 40), 65535, dtype=np.uint16)
    array[:, 20:] = 128 * 257
    path = _save(Image.fromarray(array), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((30, 5)) == (128, 128, 128)


def test_float_and_int32_images(tmp_path):
    floats = np.full((40, 40), 0.5, dtype=np.float32)
    assert load_image(_save(Image.fromarray(floats), tmp_path / "f.tiff")).getpixel((1, 1)) == (128, 128, 128)
    ints = np.full((40, 40), 200, dtype=np.int32)
    assert load_image(_save(Image.fromarray(ints), tmp_path / "i.tiff")).getpixel((1, 1)) == (200, 200, 200)


def test_cmyk(tmp_path):
    out = load_image(_save(Image.new("CMYK", SIZE, (0, 255, 255, 0)), tmp_path / "c.tiff"))
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", SIZE, (255, 0, 0)), Image.new("RGB", SIZE, (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 2
    assert load_image(path).getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 60), (255, 0, 0))
    image.paste((0, 0, 255), (0, 30, 40, 60))  # stored: red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_save(image, tmp_path / "rot.png", exif=exif))
    assert out.size == (60, 40)
    assert out.getpixel((50, 20)) == (255, 0, 0) and out.getpixel((10, 20)) == (0, 0, 255)


# --- tensors, saving, grids ---------------------------------------------------------------------

def test_image_to_tensor_centre_crop_range_shape():
    image = Image.new("RGB", (64, 40), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 12, 40))
    image.paste((0, 0, 255), (52, 0, 64, 40))
    tensor = image_to_tensor(image, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.equal(tensor, expected)  # side strips cropped away, green in [-1, 1]
    noise = image_to_tensor(Image.effect_noise((50, 70), 100).convert("RGB"), 24)
    assert noise.shape == (3, 24, 24) and noise.min() >= -1 and noise.max() <= 1 and noise.std() > 0.1


def test_save_image_atomic_round_trip(tmp_path):
    image = Image.effect_noise(SIZE, 80).convert("RGB")
    path = tmp_path / "sub" / "out.png"
    save_image_atomic(image, path)
    save_image_atomic(image, path)  # overwrite in place
    assert np.array_equal(np.array(Image.open(path)), np.array(image))
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(DatencoderError, match="unknown image extension"):
        save_image_atomic(image, tmp_path / "out.xyz")


def test_make_grid_layout_and_labels():
    tiles = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    plain = make_grid(tiles, cols=2, pad=2)
    assert plain.size == (2 * 10 + 3 * 2, 2 * 10 + 3 * 2)
    assert plain.getpixel((2, 2)) == (255, 0, 0)
    assert plain.getpixel((14, 2)) == (0, 255, 0)
    assert plain.getpixel((2, 14)) == (0, 0, 255)
    assert plain.getpixel((14, 14)) == (255, 255, 255)  # empty cell
    labelled = make_grid(tiles, cols=3, labels=["red", "a very long label", "b"], pad=2)
    assert labelled.height > 10 + 2 * 2
    below = np.array(labelled)[2 + 10:, :, :]
    assert (below < 128).any()  # dark text drawn under the tiles
    with pytest.raises(DatencoderError):
        make_grid(tiles, cols=2, labels=["one"])
