"""The shipped model as a user runs it: every command in bf16 (the precision docs/commands.md
recommends on a CPU), and an export whose README.txt code (run in a fresh process that never imports
datencoder) makes the image of the command it names, for a concept with its own sampling settings."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_export import _random_concept
from test_export_minisd import RUNNER, _printed_code

from datencoder.base import DEFAULT_BASE, load_base
from datencoder.io import ASSETS
from datencoder.recipes import cli

SHIPPED = ASSETS / DEFAULT_BASE
pytestmark = pytest.mark.skipif(not (SHIPPED / "unet").is_dir(), reason="minisd-emoji is not installed")
DUCK = ASSETS / "demo" / "duck.png"


def _ok(capsys, argv) -> str:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out


def test_fingerprint_does_not_depend_on_the_load_dtype():
    prints = {d: load_base(DEFAULT_BASE, with_image_tower=False, torch_dtype=d).fingerprint
              for d in ("fp32", "bf16", "fp16")}
    assert len(set(prints.values())) == 1, prints


@pytest.mark.slow  # three loads of the shipped model and a demo: about a minute on 2 CPU cores
def test_every_command_runs_the_shipped_model_in_bf16(capsys, tmp_path):
    concept = tmp_path / "duck"
    out = _ok(capsys, ["personalize", DUCK, "--out", concept, "--steps", "1", "--dtype", "bf16"])
    assert "in bf16" in out
    _ok(capsys, ["generate", concept, "a photo of S*", "--steps", "2", "--num-images", "1", "--dtype", "bf16",
                 "--out", tmp_path / "g"])
    image = np.asarray(Image.open(tmp_path / "g" / "000.png")).astype(int)
    assert image.std() > 1  # not a blank (NaN) image
    _ok(capsys, ["demo", "--image", DUCK, "--steps", "1", "--sample-steps", "2", "--dtype", "bf16",
                 "--out", tmp_path / "demo.png"])
    assert (tmp_path / "demo.png").is_file()


def test_same_name_other_weights_names_the_model_once():
    from datencoder.errors import DatencoderError
    from datencoder.io import check_base

    base = load_base(DEFAULT_BASE, with_image_tower=False)
    with pytest.raises(DatencoderError) as info:
        check_base("concept c", {"name": DEFAULT_BASE, "fingerprint": "0123456789abcdef"}, base)
    assert str(info.value).count(DEFAULT_BASE) == 1 and "other weights" in str(info.value)


@pytest.mark.slow  # two 3-step generations of the 64-pixel default and a fresh process: about 30 s
def test_export_readme_code_makes_the_image_of_the_command_it_names(capsys, tmp_path):
    base = load_base(DEFAULT_BASE, with_image_tower=False)
    concept = _random_concept(base, seed=8)
    concept.config = {"sample": {"steps": 3, "guidance": 4.0, "seed": 2, "num_images": 4}}  # not the defaults
    concept.save(tmp_path / "concept")
    _ok(capsys, ["export", tmp_path / "concept", "--out", tmp_path / "export"])
    readme = (tmp_path / "export" / "README.txt").read_text()
    named = re.search(r"`(datencoder generate <concept folder> [^`]*)`", " ".join(readme.split())).group(1)
    assert "--steps 3" in named and "--guidance 4.0" in named and "--seed 2" in named
    argv = shlex.split(named.replace("<concept folder>", shlex.quote(str(tmp_path / "concept"))))[1:]
    _ok(capsys, [*argv, "--out", tmp_path / "gen"])
    done = subprocess.run([sys.executable, "-c", RUNNER, _printed_code(readme), str(tmp_path / "theirs.npy")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = np.load(tmp_path / "theirs.npy").astype(int)
    ours = np.asarray(Image.open(tmp_path / "gen" / "000.png")).astype(int)
    assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1
