"""Paired pre-training (data.pair_by): the encoder sees one render, the loss reconstructs another.

The properties: a pair's target is another row of the same group and the prompt describes the
target row (not the input's); the encoder's prediction depends on the input alone and the loss on
the target; a paired pre-training runs and resumes exactly; bad settings fail in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datencoder.config import Config, from_dict, load_config
from datencoder.dataset import ImageFolderDataset
from datencoder.errors import DatencoderError
from datencoder.pretraining import pretrain

TEMPLATES = ["S*, {position}, on {a_background} background", "an emoji of S*, {position}, on {a_background} background"]
# three concepts, 3 composed rows each (concept c, row r: a colour and a layout of its own), one clean source
# per concept; a fourth concept with a single row (its only partner is itself)
LAYOUTS = [("red", "left"), ("blue", "top right"), ("white", "center")]


def _image(colour) -> Image.Image:
    """A 40 x 40 image of ``colour`` with a black left third, so a mirrored copy differs."""
    image = Image.new("RGB", (40, 40), colour)
    image.paste((0, 0, 0), (0, 0, 13, 40))
    return image


@pytest.fixture()
def manifest(tmp_path):
    for folder in ("images", "sources"):
        (tmp_path / folder).mkdir()
    rows = []
    for c in range(4):
        _image((0, 60 * c, 250)).save(tmp_path / "sources" / f"c{c}.png")
        for r, (background, position) in enumerate(LAYOUTS[: 1 if c == 3 else 3]):
            _image((60 * c, 80 * r, 0)).save(tmp_path / "images" / f"c{c}_{r}.png")
            rows.append({"file": f"images/c{c}_{r}.png", "source": f"sources/c{c}.png", "concept": f"c{c}",
                         "split": "train", "background": background, "position": position})
    rows.append({"file": "images/c0_0.png", "source": "sources/c0.png", "concept": "c0", "split": "val",
                 "background": "red", "position": "left"})  # another split: never a partner
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r for r in rows if r["split"] == "train"]


def _dataset(path, **kw):
    return ImageFolderDataset("", 32, TEMPLATES, manifest=path, splits=["train"], pair_by="concept", **kw)


def _prompt(row, template):
    article = "an" if row["background"][0] in "aeiou" else "a"
    return template.replace("{position}", row["position"]).replace("{a_background}", f"{article} {row['background']}")


def _row_of(ds, rows, pixels):
    """The manifest row whose composed image equals ``pixels`` (the fixture's images differ)."""
    hits = [i for i, row in enumerate(rows) if torch.equal(ds._load(ds.manifest_root / row["file"]), pixels)]
    assert len(hits) == 1
    return hits[0]


def test_a_pair_is_another_render_of_the_same_concept_described_by_its_own_prompt(manifest):
    path, rows = manifest
    ds = _dataset(path, hflip=False, scale_min=1.0)  # no augmentation: the input is its row's image
    ds.manifest_root = path.parent
    assert ds.paired and len(ds) == len(rows) == 10
    partners_seen = {i: set() for i in range(len(rows))}
    for i in range(len(rows)):
        for seed in range(12):
            pixels, target, prompt = ds.pair_item(i, torch.Generator().manual_seed(seed))
            assert _row_of(ds, rows, pixels) == i
            j = _row_of(ds, rows, target)
            assert rows[j]["concept"] == rows[i]["concept"]
            if rows[i]["concept"] != "c3":  # a concept with more than one row never pairs a row with itself
                assert j != i
            assert prompt in {_prompt(rows[j], t) for t in TEMPLATES}  # the target's layout, not the input's
            partners_seen[i].add(j)
    # every other row of the concept is drawn (the draw is not stuck on one partner)
    assert all(len(partners_seen[i]) == (1 if rows[i]["concept"] == "c3" else 2) for i in partners_seen)
    # the draw is a pure function of the generator
    a = ds.pair_item(4, torch.Generator().manual_seed(7))
    b = ds.pair_item(4, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_pair_input_source_gives_the_encoder_the_clean_render(manifest):
    path, rows = manifest
    ds = _dataset(path, pair_input="source", hflip=False, scale_min=1.0)
    ds.manifest_root = path.parent
    targets = set()
    for i, row in enumerate(rows):
        for seed in range(12):
            pixels, target, _ = ds.pair_item(i, torch.Generator().manual_seed(seed))
            assert torch.equal(pixels, ds._load(path.parent / row["source"]))
            j = _row_of(ds, rows, target)
            assert rows[j]["concept"] == row["concept"]
            targets.add((i, j))
    assert (0, 0) in targets  # a clean source and its own composed row are two renders


def test_input_flips_do_not_touch_the_targets_layout(manifest):
    path, rows = manifest
    ds = _dataset(path, hflip=True)  # allowed: only the input is mirrored, the target's prompt stays true
    ds.manifest_root = path.parent
    flipped = 0
    for seed in range(16):
        pixels, target, _ = ds.pair_item(4, torch.Generator().manual_seed(seed))
        _row_of(ds, rows, target)  # the target is a row's image, unaugmented
        flipped += torch.equal(pixels, ds.clean(4).flip(-1))
    assert flipped > 0
    with pytest.raises(DatencoderError, match="hflip"):  # unpaired, a flip would make {position} wrong
        ImageFolderDataset("", 32, TEMPLATES, manifest=path, splits=["train"])


@pytest.mark.parametrize("problem, match", [
    ("no_manifest", "needs data.manifest"),
    ("missing_field", "no such field"),
    ("use_source", "use_source=false"),
    ("bad_input", "pair_input"),
])
def test_bad_pair_settings_fail_in_one_line(manifest, tmp_path, problem, match):
    path, _ = manifest
    with pytest.raises(DatencoderError, match=match):
        if problem == "no_manifest":
            ImageFolderDataset(tmp_path / "images", 32, ["S*"], pair_by="concept")
        elif problem == "missing_field":
            ImageFolderDataset("", 32, ["S*"], manifest=path, splits=["train"], pair_by="colour")
        elif problem == "use_source":
            ImageFolderDataset("", 32, ["S*"], manifest=path, splits=["train"], pair_by="concept", use_source=True)
        else:
            ImageFolderDataset("", 32, ["S*"], manifest=path, splits=["train"], pair_by="concept", pair_input="x")


def test_config_refuses_pairs_without_a_manifest():
    with pytest.raises(DatencoderError, match="needs data.manifest"):
        from_dict(Config, {"data": {"pair_by": "concept"}})
    with pytest.raises(DatencoderError, match="pair_input"):
        from_dict(Config, {"data": {"pair_input": "clean"}})


class _Spy:
    """The objective, recording the latents each loss reconstructs."""

    def __init__(self, objective):
        self.objective, self.latents = objective, []

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, batch, *args, **kwargs):
        self.latents.append(batch.latents.clone())
        return self.objective(batch, *args, **kwargs)


def test_the_encoder_sees_the_input_and_the_loss_the_target(tiny_base_dir):
    from tests.test_core import make_system

    system = make_system(tiny_base_dir)
    spy = system.objective = _Spy(system.objective)
    g = torch.Generator().manual_seed(0)
    shape = (3, 3, system.base.resolution, system.base.resolution)  # 3 rows: no batch size divides it
    pixels, target, other = (torch.rand(shape, generator=g) * 2 - 1 for _ in range(3))
    prompts = ["S*", "a photo of S*", "S*, on a blue background"]

    def step(x, y):
        with torch.no_grad():
            _, out = system.training_step(x, prompts, torch.Generator().manual_seed(1), y)
        return spy.latents[-1], out.embedding

    latents, emb = step(pixels, target)
    latents_other_target, emb_other_target = step(pixels, other)
    latents_other_input, emb_other_input = step(other, target)
    assert torch.equal(emb, emb_other_target)  # the target never reaches the encoder
    assert not torch.allclose(emb, emb_other_input)  # the input does
    assert torch.equal(latents, latents_other_input)  # the loss reconstructs the target ...
    assert not torch.allclose(latents, latents_other_target)  # ... and only the target
    with pytest.raises(DatencoderError, match="do not match"):
        system.training_step(pixels, prompts, torch.Generator().manual_seed(1), target[:2])


def test_paired_pretraining_runs_and_resumes_exactly(tiny_base_dir, manifest, tmp_path):
    path, _ = manifest

    def cfg(out):
        return load_config("tiny", [f"model.pretrained={tiny_base_dir}", f"data.manifest={path}",
                                    "data.pair_by=concept", "data.pair_input=source", "data.hflip=false",
                                    f"data.templates={json.dumps(TEMPLATES)}", f"train.output_dir={out}",
                                    "train.steps=3", "train.batch_size=3", "train.checkpoint_every=1",
                                    'tune.templates=["S*"]'])

    with pytest.raises(DatencoderError, match="set tune.templates"):  # refused before any loading
        pretrain(load_config("tiny", [f"model.pretrained={tmp_path / 'no-base'}", f"data.manifest={path}",
                                      "data.pair_by=concept", f"data.templates={json.dumps(TEMPLATES)}",
                                      f"train.output_dir={tmp_path / 'refused'}", "tune.templates=null"]))
    assert not (tmp_path / "refused").exists()
    straight = pretrain(cfg(tmp_path / "straight"))
    assert straight.step == 3
    cut = cfg(tmp_path / "cut")
    pretrain(cut, max_steps=2)
    pretrain(cut, resume=True)
    a = load_file(str(tmp_path / "straight" / "encoder" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "cut" / "encoder" / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unpaired = pretrain(load_config("tiny", [f"model.pretrained={tiny_base_dir}", f"data.manifest={path}",
                                             f"train.output_dir={tmp_path / 'unpaired'}", "train.steps=3",
                                             "train.batch_size=3"]))
    c = load_file(str(tmp_path / "unpaired" / "encoder" / "encoder.safetensors"))
    assert unpaired.step == 3 and not all(torch.equal(a[k], c[k]) for k in a)
