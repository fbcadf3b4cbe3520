"""The one atomic writer family, the folder swap and the one pixel pair (datencoder.io)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder import io
from datencoder.errors import DatencoderError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- pixels ----------------------------------------------------------------------------------
def test_pixel_round_trip_is_exact_on_every_uint8_value():
    values = torch.arange(256, dtype=torch.uint8)
    hwc = values.view(16, 16, 1).expand(16, 16, 3).clone()
    pixels = io.to_pixels(hwc)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert torch.equal(io.to_uint8(pixels), hwc)


def test_to_pixels_accepts_pil_numpy_and_batches():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    batch = io.to_pixels(array)
    assert batch.shape == (2, 3, 5, 7)
    from_pil = io.to_pixels(Image.fromarray(array[1]))
    assert torch.equal(from_pil, batch[1])
    assert torch.equal(io.to_pixels(torch.from_numpy(array)), batch)
    # a grey or RGBA image is converted to RGB first
    assert io.to_pixels(Image.fromarray(array[0, :, :, 0], mode="L")).shape == (3, 5, 7)


def test_to_uint8_clamps_and_to_pil_inverts_to_pixels():
    out = io.to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5))
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8))
    back = io.to_pil(io.to_pixels(image))
    assert isinstance(back, Image.Image) and back.tobytes() == image.tobytes()
    listed = io.to_pil(io.to_pixels(image)[None].repeat(2, 1, 1, 1))
    assert isinstance(listed, list) and len(listed) == 2 and listed[1].tobytes() == image.tobytes()


# -- files -----------------------------------------------------------------------------------
def test_file_writers_round_trip_with_usual_permissions_and_no_leftovers(tmp_path):
    io.write_text_atomic(tmp_path / "a" / "t.txt", "hello")
    io.write_json_atomic(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    tensors = {"x": torch.arange(6, dtype=torch.float32).view(2, 3)}
    io.save_tensors_atomic(tmp_path / "k.safetensors", tensors, kind="concept")
    io.save_file_atomic(tmp_path / "p.safetensors", tensors)
    io.write_atomic(tmp_path / "raw.bin", lambda tmp: open(tmp, "wb").write(b"\x00\x01"))
    assert (tmp_path / "a" / "t.txt").read_text() == "hello"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    assert torch.equal(io.load_tensors(tmp_path / "k.safetensors", "concept")["x"], tensors["x"])
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(DatencoderError, match="not written by datencoder"):
        io.load_tensors(tmp_path / "p.safetensors", "concept")
    want = 0o666 & ~_umask()
    for name in ("a/t.txt", "j.json", "k.safetensors", "p.safetensors", "raw.bin"):
        assert _mode(tmp_path / name) == want, name
    assert not [p for p in tmp_path.rglob(".*")], "temp files left behind"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "t.txt"
    io.write_text_atomic(target, "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.write_atomic(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_unwritable_target_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatencoderError, match="could not write") as info:
        io.write_text_atomic(tmp_path / "file" / "below.txt", "y")
    assert "\n" not in str(info.value)


# -- folders ---------------------------------------------------------------------------------
def test_atomic_dir_swaps_on_success_with_usual_permissions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with io.atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old folder stays readable until the swap
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _mode(out) == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_leaves_old_folder_intact_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_creates_a_new_folder(tmp_path):
    out = tmp_path / "deep" / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"


def test_crash_between_the_renames_leaves_the_old_folder_at_dot_old(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        io.replace_dir(new, out)
    monkeypatch.undo()
    assert not out.exists()
    assert (tmp_path / ".out.old" / "old.txt").read_text() == "old"
    assert (new / "new.txt").read_text() == "new"
    # the next swap clears the stale .old and completes
    io.replace_dir(new, out)
    assert (out / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
