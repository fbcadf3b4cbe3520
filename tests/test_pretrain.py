"""Pre-training recipe: exact resume, shipped configs, the CLI, data set behaviour."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datencoder.config import Config, TrainConfig, load_config, shipped_configs_dir
from datencoder.dataset import ImageFolderDataset
from datencoder.errors import DatencoderError
from datencoder.recipes import cli
from datencoder.pretraining import pretrain as train
from datencoder.training import lr_factor

TEMPLATES = ["a photo of S*", "S*"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_images")
    rng = np.random.default_rng(0)
    (root / "nested").mkdir()
    for i in range(4):
        folder = root / "nested" if i % 2 else root
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return root


def _tiny_cfg(base_dir, image_dir, out, **train) -> Config:
    overrides = [f"model.pretrained={base_dir}", f"data.root={image_dir}", f"train.output_dir={out}"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("tiny", overrides)


def test_resume_is_bit_identical(tiny_base_dir, image_dir, tmp_path):
    settings = dict(steps=4, checkpoint_every=2, grad_accum=2, lr_schedule="cosine", warmup_steps=1)
    straight = train(_tiny_cfg(tiny_base_dir, image_dir, tmp_path / "straight", **settings))
    assert straight.step == 4
    cut = _tiny_cfg(tiny_base_dir, image_dir, tmp_path / "cut", **settings)
    first = train(cut, max_steps=2)
    assert first.step == 2 and first.steps_this_run == 2
    with pytest.raises(DatencoderError, match="--resume"):
        train(cut)  # refuses to overwrite a checkpoint silently
    second = train(cut, resume=True)
    assert second.step == 4 and second.steps_this_run == 2

    a = load_file(str(tmp_path / "straight" / "encoder" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "cut" / "encoder" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The log of the resumed run continues the first one, without duplicated steps.
    rows = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the collapse watch: nearest words of the 2 x 2 predictions of each logged step
    assert all(1 <= r["health_distinct_nearest"] <= 4 and 0.25 <= r["health_top_word_share"] <= 1 for r in rows)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["step"] == 4 and ckpt["position"] == 4 * 2 * 2


def test_training_changes_the_encoder(tiny_base_dir, image_dir, tmp_path):
    """Guards the resume test against a loop that never updates: step 2 differs from step 4."""
    cfg = _tiny_cfg(tiny_base_dir, image_dir, tmp_path / "run", steps=4, checkpoint_every=2, sample_every=2)
    train(cfg, max_steps=2)
    with Image.open(tmp_path / "run" / "samples" / "step_000002.png") as grid:
        assert grid.width > grid.height  # 2 images x (input + 2 prompts)
    at2 = load_file(str(tmp_path / "run" / "encoder" / "encoder.safetensors"))
    train(cfg, resume=True)
    at4 = load_file(str(tmp_path / "run" / "encoder" / "encoder.safetensors"))
    assert any(not torch.equal(at2[k], at4[k]) for k in at2)


def test_lr_schedule():
    factors = [lr_factor(s, 4, 10, "cosine") for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(x > y for x, y in zip(factors[4:], factors[5:]))
    assert lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 4, 10) == 1.0


def _config_classes() -> dict[str, type]:
    from datencoder.eval.config import EvalConfig
    from datencoder.emoji.minisd.config import UNetStageConfig, VAEStageConfig
    from datencoder.emoji.minisd.extra_stages import EvaluatorStageConfig, TowerStageConfig

    return {
        "tiny.yaml": Config, "minisd_encoder.yaml": Config, "sd15.yaml": Config,
        "minisd_vae.yaml": VAEStageConfig, "minisd_unet.yaml": UNetStageConfig,
        "minisd_unet_zsnr.yaml": UNetStageConfig, "minisd_unet_world.yaml": UNetStageConfig,
        "minisd_unet_world_k16.yaml": UNetStageConfig, "minisd_evaluator_world.yaml": EvaluatorStageConfig,
        "minisd_tower.yaml": TowerStageConfig, "minisd_evaluator.yaml": EvaluatorStageConfig,
        "minisd_encoder_no_contrastive.yaml": Config, "minisd_encoder_no_hypernet.yaml": Config,
        "minisd_encoder_full_hypernet.yaml": Config, "minisd_encoder_apart.yaml": Config,
        "minisd_encoder_distinct.yaml": Config, "minisd_encoder_captioned.yaml": Config,
        "minisd_encoder_full_distinct.yaml": Config, "minisd_encoder_factorized.yaml": Config,
        "minisd_e4t_animals.yaml": Config, "eval_minisd.yaml": EvalConfig, "eval_minisd_fixed.yaml": EvalConfig,
        "minisd_encoder_pairs.yaml": Config, "minisd_encoder_pairs_clean.yaml": Config,
        "minisd_encoder_pairs_no_contrastive.yaml": Config, "minisd_encoder_unpaired.yaml": Config,
        "eval_world.yaml": EvalConfig,
    }


def test_every_shipped_config_loads():
    classes = _config_classes()
    files = sorted(p.name for p in shipped_configs_dir().glob("*.yaml"))
    unknown = [name for name in files if name not in classes]
    assert not unknown, f"register new configs with their dataclass in this test: {unknown}"
    for name in files:
        cfg = load_config(shipped_configs_dir() / name, cls=classes[name])
        assert isinstance(cfg, classes[name])


def _differing(main: dict, name: str) -> set[tuple[str, str]]:
    """The (section, key) pairs where shipped config ``name`` differs from ``main`` (output_dir aside)."""
    from datencoder.config import to_dict

    other = to_dict(load_config(shipped_configs_dir() / name))
    return {(section, key) for section, values in main.items() if isinstance(values, dict)
            for key in values if values[key] != other[section][key]} - {("train", "output_dir")}


def test_encoder_ablation_configs_differ_from_the_main_one_only_where_they_say():
    from datencoder.config import to_dict

    main = to_dict(load_config(shipped_configs_dir() / "minisd_encoder.yaml"))
    expected = {"minisd_encoder_no_contrastive.yaml": {("loss", "contrastive_weight")},
                "minisd_encoder_no_hypernet.yaml": {("encoder", "use_hypernetwork")},
                "minisd_encoder_full_hypernet.yaml": {("encoder", "hypernet_mode")},
                "minisd_encoder_factorized.yaml": {("encoder", "hypernet_mode")},
                "minisd_encoder_apart.yaml": {("loss", "predicted_negatives")},
                "minisd_encoder_distinct.yaml": {("loss", "predicted_negatives"), ("loss", "distinct_positives")},
                "minisd_encoder_captioned.yaml": {("data", "templates"), ("data", "hflip"), ("tune", "templates")},
                "minisd_encoder_full_distinct.yaml": {("encoder", "hypernet_mode"), ("loss", "predicted_negatives"),
                                                      ("loss", "distinct_positives")}}
    for name, keys in expected.items():
        assert _differing(main, name) == keys, name


def test_paired_ablation_configs_differ_from_the_default_recipe_only_where_they_say():
    from datencoder.config import to_dict

    main = to_dict(load_config(shipped_configs_dir() / "minisd_encoder_pairs_clean.yaml"))
    assert main["data"]["pair_by"] == "concept" and main["data"]["pair_input"] == "source"
    expected = {"minisd_encoder_pairs.yaml": {("data", "pair_input")},
                "minisd_encoder_pairs_no_contrastive.yaml": {("loss", "contrastive_weight")},
                "minisd_encoder_unpaired.yaml": {("data", "pair_by"), ("data", "pair_input"), ("data", "templates"),
                                                 ("tune", "templates")}}
    for name, keys in expected.items():
        assert _differing(main, name) == keys, name


def test_configs_that_do_not_pin_a_recorded_design_use_the_default_hypernetwork():
    from datencoder.config import EncoderConfig

    for name in ("sd15.yaml", "tiny.yaml", "minisd_encoder_factorized.yaml"):
        mode = load_config(shipped_configs_dir() / name).encoder.hypernet_mode
        assert mode == EncoderConfig().hypernet_mode == "factorized", name


def test_cli_pretrain_writes_an_encoder(tiny_base_dir, image_dir, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "datencoder.recipes.cli", "pretrain", "configs/tiny.yaml",
           f"model.pretrained={tiny_base_dir}", f"data.root={image_dir}", "train.steps=3",
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "encoder" / "encoder.safetensors").is_file()
    assert "3 steps" in proc.stdout or "step 3/3" in proc.stdout
    meta = json.loads((out / "encoder" / "encoder.json").read_text())
    assert meta["config"]["train"]["steps"] == 3 and meta["info"]["complete"] is True


@pytest.mark.parametrize("problem", ["empty_folder", "unknown_key"])
def test_cli_errors_are_one_line(problem, tiny_base_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    args = ["pretrain", "tiny", f"model.pretrained={tiny_base_dir}", f"data.root={empty}",
            f"train.output_dir={tmp_path / 'out'}"]
    if problem == "unknown_key":
        args.append("train.stepz=3")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert ("no images" in err) if problem == "empty_folder" else ("train.stepz" in err)


def test_dataset_scan_items_and_bad_files(image_dir, tmp_path, caplog):
    ds = ImageFolderDataset(image_dir, 32, TEMPLATES)
    assert [p.relative_to(image_dir).as_posix() for p in ds.files] == \
        ["img0.png", "img2.png", "nested/img1.png", "nested/img3.png"]
    pixels, prompt = ds.item(1, torch.Generator().manual_seed(5))
    again, prompt2 = ds.item(1, torch.Generator().manual_seed(5))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels, again) and prompt == prompt2 and prompt in TEMPLATES

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a_bad.png").write_bytes(b"not a png")
    Image.open(image_dir / "img0.png").save(broken / "b_good.png")
    ds = ImageFolderDataset(broken, 32, TEMPLATES)
    with caplog.at_level(logging.WARNING):
        substitute = ds.clean(0)  # the unreadable file is replaced by the next readable one
    assert torch.equal(substitute, ds.clean(1))
    assert "a_bad.png" in caplog.text


def test_templates_name_manifest_fields(tmp_path):
    from datencoder.dataset import fill_template

    assert fill_template("S*, {size}, on {a_background} background", {"size": "small", "background": "orange"}) \
        == "S*, small, on an orange background"
    with pytest.raises(DatencoderError, match="names {colour}"):
        fill_template("S* in {colour}", {"background": "red"})
    (tmp_path / "images").mkdir()
    rows = []
    for i, (background, position) in enumerate([("red", "left"), ("blue", "top right"), ("white", "center")]):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"file": f"images/{i}.png", "source": "sources/0.png", "split": "train",
                     "background": background, "position": position})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = ["S*, {position}, on {a_background} background", "S* on {background}"]
    ds = ImageFolderDataset("", 32, templates, manifest=manifest, splits=["train"], hflip=False)
    for i in range(3):  # every item's prompt describes its own image, whichever template is drawn
        for seed in range(4):
            _, prompt = ds.item(i, torch.Generator().manual_seed(seed))
            assert prompt in (f"S*, {rows[i]['position']}, on a {rows[i]['background']} background",
                              f"S* on {rows[i]['background']}")
    with pytest.raises(DatencoderError, match="hflip"):
        ImageFolderDataset("", 32, templates, manifest=manifest, splits=["train"])
    with pytest.raises(DatencoderError, match="use_source=false"):
        ImageFolderDataset("", 32, ["S* on {background}"], manifest=manifest, splits=["train"], use_source=True)
    with pytest.raises(DatencoderError, match="need"):
        ImageFolderDataset(tmp_path / "images", 32, ["S* on {background}"])
    with pytest.raises(DatencoderError, match=r"\['size'\]"):
        ImageFolderDataset("", 32, ["S*, {size}"], manifest=manifest, splits=["train"])


def test_dataset_manifest_splits_and_sources(tmp_path):
    for folder in ("images", "sources"):
        (tmp_path / folder).mkdir()
    rows = []
    for i, split in enumerate(["train", "train", "val"]):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        Image.new("RGB", (40, 40), (0, 0, 200)).save(tmp_path / "sources" / f"{i // 2}.png")
        rows.append({"file": f"images/{i}.png", "source": f"sources/{i // 2}.png", "split": split})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageFolderDataset("", 32, TEMPLATES, manifest=manifest, splits=["train"])
    assert [p.name for p in ds.files] == ["0.png", "1.png"]
    sources = ImageFolderDataset("", 32, TEMPLATES, manifest=manifest, splits=["train"], use_source=True)
    assert [p.relative_to(tmp_path).as_posix() for p in sources.files] == ["sources/0.png"]
    with pytest.raises(DatencoderError, match="no images"):
        ImageFolderDataset("", 32, TEMPLATES, manifest=manifest, splits=["test"])
