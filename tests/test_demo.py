"""`datencoder demo` end to end in a subprocess, on the tiny model with an untrained encoder.

The shipped-model demo needs the pre-trained embedded encoder; without it the command must
say so in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from datencoder.base import load_base
from datencoder.config import Config, from_dict
from datencoder.system import DEFAULT_ENCODER_DIR, EncoderSystem


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "datencoder.recipes.cli", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_writes_one_grid_with_both_rows(tiny_base_dir, tmp_path):
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hidden_dim": 32}, "tune": {"batch_size": 2}})
    EncoderSystem(load_base(str(tiny_base_dir)), cfg).save(tmp_path / "enc")
    out = _run("--encoder", str(tmp_path / "enc"), "--image", "duck", "--steps", "2", "--sample-steps", "2",
               "--out", "grid.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "encoder+tuning" in out.stdout and "wrote grid.png" in out.stdout
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 2.5 * grid.height  # 2 rows x 8 tiles (input + 7 prompts), labels under each


def test_demo_without_an_encoder_is_one_line(tmp_path):
    if (DEFAULT_ENCODER_DIR / "encoder.json").exists():
        out = _run("--encoder", str(tmp_path / "missing"), cwd=tmp_path)
    else:
        out = _run(cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no encoder at") and "Traceback" not in out.stderr


def test_demo_on_the_shipped_model(tmp_path):
    import pytest

    if not (DEFAULT_ENCODER_DIR / "encoder.json").exists():
        pytest.skip("the embedded encoder is not shipped in this checkout")
    out = _run("--steps", "2", "--sample-steps", "3", "--out", "demo.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    grid = Image.open(tmp_path / "demo.png")
    assert grid.width > 2.5 * grid.height  # 2 rows x 8 tiles (input + 7 prompts), labels under each
    # the other shipped encoder, by its name
    out = _run("--encoder", "minisd-emoji-encoder-basis", "--steps", "1", "--sample-steps", "2", "--out", "b.png",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Image.open(tmp_path / "b.png").size == grid.size
