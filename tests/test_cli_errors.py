"""Bad input to the CLI: one line ``error: ...``, exit code 2, no traceback (docs/errors.md).

Each case is a real ``datencoder`` command line. To pay the ~5 s import once, a single
subprocess (a fresh interpreter, as the console script) runs every case through
``datencoder.recipes.cli.main`` -- the console script's entry point -- capturing its exit code
and everything it writes to stderr; one more case runs through the ``python -m`` entry point in
its own process. Odd but valid images (RGBA, 16-bit) must personalise fine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datencoder.base import load_base
from datencoder.config import TuneConfig
from datencoder.system import EncoderSystem
from datencoder.testing import build_tiny_base
from datencoder.tuning import personalize

# Runs in the subprocess: argv[1] is a JSON file {case: [cli args]}; prints {case: {rc, stderr}}.
DRIVER = textwrap.dedent("""
    import contextlib, io, json, logging, sys, traceback
    from datencoder.recipes.cli import main

    results = {}
    for name, argv in json.load(open(sys.argv[1])).items():
        err = io.StringIO()
        logging.root.handlers.clear()  # main() installs a fresh handler on the captured stderr
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as exit:
                rc = exit.code
            except BaseException:
                traceback.print_exc()
                rc = "traceback"
        results[name] = {"rc": rc, "stderr": err.getvalue()}
    print(json.dumps(results))
""")


from cli_helpers import tiny_encoder_config  # noqa: E402

def _world(root, base_dir):
    """Encoder, concept, another base and bad inputs on disk: {name: path}."""
    (root / "base0").symlink_to(base_dir)
    base = load_base(str(base_dir))
    cfg = tiny_encoder_config(base_dir)
    system = EncoderSystem(base, cfg)
    system.save(root / "encoder")
    pixels = torch.rand(3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    personalize(system, pixels, TuneConfig(steps=0)).save(root / "concept")

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "ok.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 48), dtype=np.uint8)])).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I;16")
    Image.fromarray(rgb[:16, :16]).save(root / "small.png")
    (root / "notes.png").write_text("these are my notes, not a picture\n")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "folder.png").mkdir()

    for name in ("corrupt", "foreign"):
        (root / name).mkdir()
        (root / name / "concept.json").write_text((root / "concept" / "concept.json").read_text())
    (root / "corrupt" / "concept.safetensors").write_bytes((root / "concept" / "concept.safetensors").read_bytes()[:100])
    save_file({"weight": torch.zeros(4, 4)}, str(root / "foreign" / "concept.safetensors"))  # no datencoder header
    build_tiny_base(root / "other-base", seed=1)
    return base


def _cases(r) -> dict[str, list[str]]:
    enc, concept = ["--encoder", str(r / "encoder")], str(r / "concept")
    out = ["--out", str(r / "out")]
    return {
        "missing image": ["personalize", str(r / "missing.png"), *enc, *out],
        "truncated image": ["personalize", str(r / "truncated.png"), *enc, *out],
        "text file named .png": ["personalize", str(r / "notes.png"), *enc, *out],
        "directory as image": ["personalize", str(r / "folder.png"), *enc, *out],
        "image too small": ["personalize", str(r / "small.png"), *enc, *out],
        "unknown config key": ["personalize", str(r / "ok.png"), "tune.learning_rate=1e-3", *enc, *out],
        "negative steps": ["personalize", str(r / "ok.png"), *enc, *out, "--steps", "-1"],
        "value out of its range": ["personalize", str(r / "ok.png"), "tune.batch_size=0", *enc, *out],
        "zero temperature": ["personalize", str(r / "ok.png"), "loss.tau=0", *enc, *out],
        "encoder folder missing": ["personalize", str(r / "ok.png"), "--encoder", str(r / "nope"), *out],
        "encoder for another base": ["personalize", str(r / "ok.png"), *enc, *out, "--base", str(r / "other-base")],
        "prompt without placeholder": ["generate", concept, "a photo of a dog", "--out", str(r / "gen")],
        "concept for another base": ["generate", concept, "S* on the beach", "--base", str(r / "other-base")],
        "corrupt concept": ["generate", str(r / "corrupt"), "S* on the beach"],
        "foreign safetensors": ["generate", str(r / "foreign"), "S* on the beach"],
        "concept folder missing": ["generate", str(r / "nope"), "S* on the beach"],
        "unknown scheduler": ["generate", concept, "S* on the beach", "--scheduler", "plms"],
        "unknown export format": ["export", concept, "--format", "onnx", "--out", str(r / "exp")],
        # valid, if unusual, images must work
        "rgba image": ["personalize", str(r / "rgba.png"), *enc, "--out", str(r / "c-rgba"), "--steps", "1"],
        "16-bit image": ["personalize", str(r / "grey16.png"), *enc, "--out", str(r / "c-16"), "--steps", "0"],
        # the happy paths of generate (with and without a concept) and export
        "generate concept": ["generate", concept, "a photo of S*", "--num-images", "2", "--steps", "2",
                             "--out", str(r / "gen-concept")],
        "generate plain": ["generate", "a red apple", "--base", str(r / "base0"), "--num-images", "1",
                           "--steps", "1", "--out", str(r / "gen-plain")],
        "export": ["export", concept, "--out", str(r / "export")],
    }


CONCEPT_FILES = ("concept.safetensors", "concept.json")
SUCCEEDS = {
    "rgba image": ("c-rgba", CONCEPT_FILES),
    "16-bit image": ("c-16", CONCEPT_FILES),
    "generate concept": ("gen-concept", ("000.png", "001.png", "grid.png", "generation.json")),
    "generate plain": ("gen-plain", ("000.png", "grid.png", "generation.json")),
    "export": ("export", ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.txt")),
}
EXPECTED = {  # a fragment of each message: the right problem is named
    "missing image": "image not found",
    "truncated image": "not a readable image",
    "text file named .png": "not a readable image",
    "directory as image": "is a directory",
    "image too small": "16x16 pixels",
    "unknown config key": "unknown config key 'tune.learning_rate'",
    "negative steps": "tune.steps must be >= 0",
    "value out of its range": "tune.batch_size must be >= 1, got 0",
    "zero temperature": "loss.tau must be > 0, got 0.0",
    "encoder folder missing": "encoder folder",
    "encoder for another base": "was made for base model",
    "prompt without placeholder": "does not contain the concept's placeholder S*",
    "concept for another base": "was made for base model",
    "corrupt concept": "corrupt or truncated",
    "foreign safetensors": "not written by datencoder",
    "concept folder missing": "concept folder",
    "unknown scheduler": "unknown scheduler 'plms'",
    "unknown export format": "unknown export format 'onnx'",
}


@pytest.fixture(scope="module")
def cli_results(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _world(root, tiny_base_dir)
    cases = _cases(root)
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(root / "cases.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_one_line_exit_2(cli_results, case):
    _, results = cli_results
    rc, stderr = results[case]["rc"], results[case]["stderr"]
    assert "Traceback" not in stderr, stderr
    assert rc == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert EXPECTED[case] in errors[0], errors[0]


@pytest.mark.parametrize("case", sorted(SUCCEEDS))
def test_valid_input_succeeds(cli_results, case):
    root, results = cli_results
    assert results[case]["rc"] == 0, results[case]["stderr"]
    folder, files = SUCCEEDS[case]
    assert sorted(p.name for p in (root / folder).iterdir()) == sorted(files)  # no temp files left


def test_console_entry_point_exit_code(tmp_path):
    """The real command in its own process: one stderr line, exit code 2, nothing on stdout."""
    (tmp_path / "notes.png").write_text("not a picture\n")
    done = subprocess.run([sys.executable, "-m", "datencoder.recipes.cli", "personalize", "notes.png",
                           "--encoder", "enc", "--out", "c"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 2
    assert done.stdout == ""
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [done.stderr.splitlines()[-1]], done.stderr
    assert "Traceback" not in done.stderr and "notes.png is not a readable image" in error_lines[0]
