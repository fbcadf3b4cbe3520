"""The rough edges a new user hit (issue 9, parts 8 and 5): each is a one-line error before any
compute, or a fixed behaviour. CLI cases run in-process through ``cli.main`` on the tiny base."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder.base import SUPPORTED_PIPELINES, check_family, load_base
from datencoder.io import check_output, load_tensors, save_tensors_atomic, write_json_atomic
from datencoder.concept import Concept
from datencoder.config import Config, TuneConfig, apply_overrides, from_dict, load_config, shipped_configs_dir
from datencoder.errors import DatencoderError
from datencoder.recipes import cli
from datencoder.system import DEFAULT_ENCODER, DEFAULT_ENCODER_DIR, EncoderSystem, resolve_encoder
from datencoder.tuning import personalize


from cli_helpers import cli_error as _error, tiny_encoder_config  # noqa: E402

@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    """An untrained encoder and two concepts on the tiny base, and an image: {name: path}."""
    root = tmp_path_factory.mktemp("edges")
    base = load_base(str(tiny_base_dir))
    cfg = tiny_encoder_config(tiny_base_dir)
    system = EncoderSystem(base, cfg)
    system.save(root / "encoder")
    for i in range(2):
        pixels = torch.rand(3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(i)) * 2 - 1
        personalize(system, pixels, TuneConfig(steps=1, seed=i)).save(root / f"concept{i}")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "ok.png")
    return {"root": root, "base": tiny_base_dir, "encoder": root / "encoder", "image": root / "ok.png",
            "concept": root / "concept0", "other": root / "concept1", "max_length": base.tokenizer.model_max_length}




def _ok(capsys, argv) -> str:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out


# -- overrides and configs ----------------------------------------------------------------------
def test_overrides_read_numbers_and_words_as_yaml_1_2():
    data = apply_overrides({}, ["tune.lr_lora=3e-3", "train.mixed_precision=no", "tune.steps=012",
                                "loss.tau=.5", "encoder.tower_layers=[-1, -2]", "dual_path.enabled=false"])
    cfg = from_dict(Config, data)
    assert cfg.tune.lr_lora == 0.003 and isinstance(cfg.tune.lr_lora, float)
    assert cfg.train.mixed_precision == "no" and cfg.tune.steps == 12 and cfg.loss.tau == 0.5
    assert cfg.encoder.tower_layers == [-1, -2] and cfg.dual_path.enabled is False


def test_yaml_file_reads_numbers_as_yaml_1_2(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n  mixed_precision: no\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.lr == 1e-4 and cfg.train.mixed_precision == "no"


@pytest.mark.parametrize("override, message", [
    ("encoder.tower_layers=[-1, -2", "not valid YAML"),
    ("tune..steps=3", "empty key part"),
    ("tune.steps=yes", "must be an integer"),
])
def test_broken_override_is_one_line(override, message):
    with pytest.raises(DatencoderError, match=message) as info:
        from_dict(Config, apply_overrides({}, [override]))
    assert "\n" not in str(info.value)


MACHINE_PATHS = ("/work", "/tmp", "/home", "/root")


def test_no_shipped_config_holds_a_machine_path():
    for path in sorted(shipped_configs_dir().glob("*.yaml")):
        text = path.read_text()
        assert not [m for m in MACHINE_PATHS if m + "/" in text], path.name


def test_no_library_string_is_a_machine_path():
    """Every string constant of the package (defaults, fallbacks, dataclass fields) is free of
    paths that only exist on the machine that wrote it."""
    import ast

    import datencoder

    root = Path(datencoder.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(MACHINE_PATHS):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value}")
    assert not found, found


def test_seed_range_is_checked_up_front(capsys):
    with pytest.raises(DatencoderError, match=r"tune.seed must be an integer in \[0, 2\*\*63 - 1\]"):
        TuneConfig(seed=2**63)
    # checked before the (missing) concept is even looked at
    assert "--seed must be an integer" in _error(capsys, ["generate", "nope", "S*", "--seed", str(2**63)])


# -- artifacts ---------------------------------------------------------------------------------
def test_tensors_and_json_get_the_same_mode(tmp_path):
    save_tensors_atomic(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, "concept")
    write_json_atomic(tmp_path / "a.json", {"kind": "concept"})
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.safetensors", "a.json")}
    assert modes == {"a.safetensors": 0o666 & ~umask, "a.json": 0o666 & ~umask}


def test_mixed_concept_pair_is_refused(world, tmp_path):
    Concept.load(world["concept"])  # an intact pair loads
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(world["concept"] / "concept.json", mixed / "concept.json")
    shutil.copy(world["other"] / "concept.safetensors", mixed / "concept.safetensors")
    with pytest.raises(DatencoderError, match="come from different saves") as info:
        Concept.load(mixed)
    assert "\n" not in str(info.value)


def test_artifacts_record_absolute_base_paths(world, monkeypatch):
    monkeypatch.chdir(Path(world["base"]).parent)
    base = load_base(Path(world["base"]).name, with_image_tower=False)  # a relative --base
    assert base.name == str(Path(world["base"]).resolve())
    meta = json.loads((world["concept"] / "concept.json").read_text())
    assert Path(meta["base"]["name"]).is_absolute()


# -- outputs checked before compute ------------------------------------------------------------
def test_output_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatencoderError, match="is an existing file"):
        check_output(tmp_path / "file")
    with pytest.raises(DatencoderError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "sub")
    with pytest.raises(DatencoderError, match="is a folder"):
        check_output(tmp_path, folder=False)
    check_output(tmp_path / "new" / "deeper")  # a folder to be created is fine
    assert not (tmp_path / "new").exists()  # and the check creates nothing


def test_read_only_location_is_refused(tmp_path):
    # Permission bits do not stop root; a read-only sysfs does, so that is the test as root.
    if os.geteuid() == 0:
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs to stand for a read-only location")
        target = Path("/sys/kernel/datencoder-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
    with pytest.raises(DatencoderError, match="cannot write to --out") as info:
        check_output(target)
    assert "\n" not in str(info.value)
    with pytest.raises(DatencoderError, match="could not write"):  # a late failure is one line too
        write_json_atomic(target / "x.json", {})


def test_generate_bad_arguments_are_refused_before_sampling(world, capsys, tmp_path):
    concept, out = world["concept"], tmp_path / "gen"
    (tmp_path / "afile").write_text("x")
    assert "is an existing file" in _error(capsys, ["generate", concept, "S*", "--out", tmp_path / "afile"])
    assert "--guidance must be a finite number" in _error(capsys, ["generate", concept, "S*", "--guidance", "nan",
                                                                  "--out", out])
    assert "--guidance must be a finite number" in _error(capsys, ["generate", concept, "S*", "--guidance", "inf",
                                                                  "--out", out])
    msg = _error(capsys, ["generate", concept, "S*", "--steps", "1001", "--out", out])
    assert "exceed the scheduler's 1000 training timesteps" in msg
    long_prompt = "a " * world["max_length"] + "S*"
    msg = _error(capsys, ["generate", concept, long_prompt, "--out", out])
    assert f"the tokenizer keeps {world['max_length']}" in msg and "cut the placeholder S*" in msg
    assert not out.exists()  # nothing was written


def test_generate_batches_and_replaces_its_own_outputs(world, capsys, tmp_path):
    concept, out = world["concept"], tmp_path / "gen"
    common = ["generate", concept, "a photo of S*", "--steps", "2"]
    _ok(capsys, [*common, "--num-images", "3", "--batch-size", "1", "--out", tmp_path / "one-by-one"])
    _ok(capsys, [*common, "--num-images", "3", "--out", out])  # one batch of 3
    for i in range(3):  # the noise stream continues across batches: the same images
        a = np.asarray(Image.open(out / f"{i:03d}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "one-by-one" / f"{i:03d}.png")).astype(int)
        # equal noise; a batched matmul may round differently from single rows (BLAS blocking,
        # threads), which moves a few pixels by a grey level -- other noise moves all by tens
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05, (i, np.abs(a - b).max())
    _ok(capsys, [*common, "--num-images", "1", "--out", out])  # a rerun leaves no stale images
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "generation.json", "grid.png"]
    assert json.loads((out / "generation.json").read_text())["complete"] is True

    foreign = tmp_path / "mine"
    foreign.mkdir()
    Image.new("RGB", (8, 8)).save(foreign / "000.png")
    assert "not written by 'datencoder generate'" in _error(capsys, [*common, "--out", foreign])


# -- personalize ---------------------------------------------------------------------------------
def test_personalize_refuses_to_replace_a_concept(world, capsys, tmp_path):
    out = tmp_path / "c"
    argv = ["personalize", world["image"], "--encoder", world["encoder"], "--out", out, "--steps", "0"]
    _ok(capsys, argv)
    first = (out / "concept.safetensors").read_bytes()
    assert "already holds a concept; pass --overwrite" in _error(capsys, argv + ["--seed", "1"])
    assert (out / "concept.safetensors").read_bytes() == first
    _ok(capsys, argv + ["--overwrite", "tune.lr_lora=3e-3"])
    (tmp_path / "f").write_text("x")
    assert "is an existing file" in _error(capsys, argv[:-4] + ["--out", tmp_path / "f"])


def test_shipped_encoder_has_a_name(world, capsys, tmp_path):
    assert resolve_encoder(DEFAULT_ENCODER) == DEFAULT_ENCODER_DIR
    assert resolve_encoder(str(world["encoder"])) == world["encoder"]
    with pytest.raises(DatencoderError, match=f"or the shipped '{DEFAULT_ENCODER}'"):
        resolve_encoder(tmp_path / "nope")
    if not (DEFAULT_ENCODER_DIR / "encoder.json").is_file():
        pytest.skip("the shipped encoder is not installed")
    out = tmp_path / "c"
    _ok(capsys, ["personalize", world["image"], "--out", out, "--steps", "0"])  # no --encoder: the shipped one
    meta = json.loads((out / "concept.json").read_text())
    # the default encoder is pre-trained for the default base; the earlier ones name v1 by its name
    assert meta["base"]["name"] == "minisd-emoji" and meta["info"]["encoder"] == str(DEFAULT_ENCODER_DIR)
    from datencoder.system import SHIPPED_ENCODERS

    for name in ("minisd-emoji-encoder-v1", "minisd-emoji-encoder-basis"):
        assert json.loads((SHIPPED_ENCODERS[name] / "encoder.json").read_text())["base"]["name"] == "minisd-emoji-v1"


def test_shipped_encoders_by_name_and_the_ship_script(world, tmp_path):
    import importlib.util

    from datencoder.system import SHIPPED_ENCODERS, encoder_path

    for name, folder in SHIPPED_ENCODERS.items():  # every shipped name maps to its package folder
        assert encoder_path(name) == folder and folder.parent.name == "assets"
    script = Path(__file__).parents[1] / "scripts" / "ship_encoder.py"
    spec = importlib.util.spec_from_file_location("ship_encoder", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    assert ship.main([str(world["encoder"]), str(tmp_path / "shipped")]) == 0
    shipped = load_tensors(tmp_path / "shipped" / "encoder.safetensors", "encoder")
    original = load_tensors(world["encoder"] / "encoder.safetensors", "encoder")
    assert shipped.keys() == original.keys()
    for key, value in shipped.items():
        assert value.dtype == (torch.float16 if original[key].is_floating_point() else original[key].dtype)
        torch.testing.assert_close(value.float(), original[key].float(), rtol=1e-3, atol=1e-3)
    meta = json.loads((tmp_path / "shipped" / "encoder.json").read_text())
    assert meta["info"]["shipped_dtype"] == "float16"
    assert EncoderSystem.load(tmp_path / "shipped").cfg.encoder.hidden_dim == 32  # it loads


# -- part 5: the family gate -------------------------------------------------------------------
@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline", "KandinskyV22Pipeline",
                                        "PixArtAlphaPipeline"])
def test_other_families_are_refused_by_name(tmp_path, class_name):
    (tmp_path / "unet").mkdir()  # Kandinsky 2.2 even has a UNet2DConditionModel
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(DatencoderError, match="supported families: Stable Diffusion 1.x/2.x") as info:
        load_base(str(tmp_path))
    assert class_name in str(info.value) and "\n" not in str(info.value)


def test_transformer_denoiser_without_model_index_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(DatencoderError, match="transformer denoiser"):
        load_base(str(tmp_path))


def test_sd_family_passes_the_gate(tiny_base_dir, tmp_path):
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline"} <= set(SUPPORTED_PIPELINES)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    check_family(tmp_path, "sdxl")  # SDXL is not refused by the gate
    folder = tmp_path / "sd"
    shutil.copytree(tiny_base_dir, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert load_base(str(folder), with_image_tower=False).fingerprint == \
        load_base(str(tiny_base_dir), with_image_tower=False).fingerprint


def test_generate_takes_its_defaults_from_the_concepts_sample_config(world, capsys, tmp_path):
    from datencoder.recipes.generate import add_arguments, sample_settings

    concept = tmp_path / "c"
    _ok(capsys, ["personalize", world["image"], "--encoder", world["encoder"], "--out", concept, "--steps", "0",
                 "sample.steps=3", "sample.guidance=2.5", "sample.scheduler=euler", "sample.seed=7",
                 "sample.num_images=2", "sample.negative_prompt=blurry", "sample.height=32", "sample.width=32"])
    out = tmp_path / "gen"
    _ok(capsys, ["generate", concept, "a photo of S*", "--out", out])
    settings = json.loads((out / "generation.json").read_text())
    assert {k: settings[k] for k in ("steps", "guidance", "scheduler", "seed", "num_images", "negative_prompt",
                                     "height", "width")} == {
        "steps": 3, "guidance": 2.5, "scheduler": "euler", "seed": 7, "num_images": 2,
        "negative_prompt": "blurry", "height": 32, "width": 32}
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "generation.json", "grid.png"]

    # flags override field by field; without a concept the SampleConfig defaults apply
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = json.loads((concept / "concept.json").read_text())["config"]
    args = parser.parse_args([str(concept), "S*", "--steps", "5", "--scheduler", "ddim", "--negative-prompt", ""])
    merged = sample_settings(args, cfg)
    assert (merged.steps, merged.scheduler, merged.negative_prompt, merged.guidance, merged.seed) == (5, "ddim", "", 2.5, 7)
    plain = sample_settings(parser.parse_args(["a dog"]), None)
    assert (plain.steps, plain.guidance, plain.num_images, plain.seed, plain.scheduler) == (25, 7.5, 4, 0, "ddim")
