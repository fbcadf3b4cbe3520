"""CLIP-I, CLIP-T and DINO on tiny random CLIPModel / Dinov2Model folders, and in the harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder.config import from_dict
from datencoder.errors import DatencoderError
from datencoder.eval.config import EvalConfig
from datencoder.eval.harness import run_evaluation
from datencoder.eval.records import read_records
from datencoder.eval.targets import folder_targets
from datencoder.eval.report import results_markdown
from datencoder.eval.paper_metrics import ClipScorer, PaperMetrics, class_prompt
from datencoder.testing import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def metrics(metric_dirs):
    return PaperMetrics(str(metric_dirs[0]), str(metric_dirs[1]))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_an_image_against_itself_scores_one_and_all_scores_are_cosines(metrics):
    images = _images(4)
    for i, image in enumerate(images):
        rec = metrics.score([image], image, ["a photo of S*"], "dog")[0]
        assert abs(rec["clip_i"] - 1) <= 1e-5 and abs(rec["dino"] - 1) <= 1e-5
    recs = metrics.score(images[1:], images[0], ["S*", "S* on the beach", "a red S*"], "dog")
    for rec in recs:
        assert set(rec) == {"clip_i", "clip_t", "dino"}
        assert all(-1 <= v <= 1 for v in rec.values())
    assert any(rec["clip_i"] < 0.9999 for rec in recs)  # different images are not all identical


def test_a_batch_scores_like_its_images_one_by_one(metrics):
    images, prompts = _images(3, seed=1), ["S*", "S* on the beach", "a photo of a red S*"]
    reference = _images(1, seed=2)[0]
    batch = metrics.score(images, reference, prompts, "cat")
    for image, prompt, rec in zip(images, prompts, batch):
        alone = metrics.score([image], reference, [prompt], "cat")[0]
        assert all(abs(alone[k] - rec[k]) <= 1e-5 for k in rec)


def test_clip_t_compares_with_the_class_word_in_place_of_the_placeholder(metrics):
    assert class_prompt("a photo of S* on the beach", "S*", "dog") == "a photo of dog on the beach"
    with pytest.raises(DatencoderError, match="placeholder"):
        class_prompt("a photo of a dog", "S*", "dog")
    image = _images(1, seed=3)[0]
    for word in ("dog", "red car"):
        expected = float(metrics.clip.images([image])[0] @ metrics.clip.texts([f"a photo of {word}"])[0])
        got = metrics.score([image], image, ["a photo of S*"], word)[0]["clip_t"]
        assert abs(got - expected) <= 1e-5
    dog, car = (metrics.score([image], image, ["a photo of S*"], w)[0]["clip_t"] for w in ("dog", "car"))
    assert dog != car


def test_models_load_from_folders_and_fail_in_one_line(metric_dirs, tmp_path):
    assert ClipScorer(str(metric_dirs[0])).preprocess.crop == 32
    with pytest.raises(DatencoderError, match="no such folder"):
        PaperMetrics(clip=str(tmp_path / "missing"))
    with pytest.raises(DatencoderError, match="could not load the DINO model"):
        PaperMetrics(dino=str(metric_dirs[0]))  # a CLIP folder is no Dinov2Model
    with pytest.raises(DatencoderError, match="needs clip_model"):
        from_dict(EvalConfig, {"scorers": ["clip"]})
    with pytest.raises(DatencoderError, match="scorers must be"):
        from_dict(EvalConfig, {"scorers": ["lpips"]})


def test_folder_targets_take_the_class_word_from_a_file_or_the_name(tmp_path):
    (tmp_path / "imgs" / "teddy_bear").mkdir(parents=True)
    for name in ("red_dog_02.png", "mug.jpg", "teddy_bear/00.png"):
        _images(1)[0].save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    words = {t.image.split("imgs/")[1]: t.name for t in folder_targets(tmp_path / "imgs")}
    assert words == {"mug.jpg": "mug", "red_dog_02.png": "red dog", "teddy_bear/00.png": "teddy bear"}
    mapping = tmp_path / "classes.csv"
    mapping.write_text("file,class\nred_dog_02.png,dog\nmug.jpg,cup\nteddy_bear/00.png,toy\n")
    assert sorted(t.name for t in folder_targets(tmp_path / "imgs", mapping)) == ["cup", "dog", "toy"]
    (tmp_path / "classes.json").write_text(json.dumps({"mug.jpg": "cup"}))
    with pytest.raises(DatencoderError, match="no class word for red_dog_02.png"):
        folder_targets(tmp_path / "imgs", tmp_path / "classes.json")


def test_harness_scores_a_folder_of_own_images_with_clip_and_dino(tiny_base_dir, metric_dirs, tmp_path):
    for name in ("dog.png", "cup_1.png"):
        _images(1, seed=len(name))[0].save(tmp_path / name)
    cfg = from_dict(EvalConfig, {
        "base": str(tiny_base_dir), "output_dir": str(tmp_path / "eval"), "prompts": ["S*", "S* on the beach"],
        "seeds": [0], "sample_steps": 2, "guidance": 2.0, "scorers": ["clip", "dino"],
        "clip_model": str(metric_dirs[0]), "dino_model": str(metric_dirs[1]),
        "targets": {"folder": str(tmp_path)}, "paired_with": "floor",
        "methods": [{"name": "floor", "kind": "textual_inversion", "steps": 0},
                    {"name": "ti-1", "kind": "textual_inversion", "steps": 1, "overrides": {"batch_size": 1}}]})
    result = run_evaluation(cfg)
    records = read_records(tmp_path / "eval")
    assert len(result["ran"]) == 4 and len(records) == 8
    assert {r["name"] for r in records} == {"dog", "cup"}
    for r in records:
        assert "identity" not in r and all(-1 <= r[k] <= 1 for k in ("clip_i", "clip_t", "dino"))
    text = results_markdown(records, paired_with="floor")
    assert "| CLIP-I | DINO | CLIP-T |" in text and "concept top-1" not in text and "Δ CLIP-T" in text
    assert json.loads((tmp_path / "eval" / "eval_setup.json").read_text())["scorers"] == ["clip", "dino"]
    assert torch.get_num_threads() >= 1


def test_preprocess_normalises_like_the_image_processors():
    from datencoder.eval.paper_metrics import Preprocess

    image = _images(1, seed=4)[0].crop((0, 0, 32, 32))  # already the crop size: resize/crop are identity
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    got = Preprocess(resize=32, crop=32, mean=mean, std=std)([image])[0]
    x01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    expected = (x01 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
