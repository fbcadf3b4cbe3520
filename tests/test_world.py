"""The world: its rule (nested, required concepts first, one per head noun), its rows, its scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datencoder.emoji.minisd.data import MiniDataConfig, read_manifest
from datencoder.emoji.world import CATEGORIES, choose_world, head_noun, read_world, world_keys, write_world
from datencoder.errors import DatencoderError

ROOT = Path(__file__).resolve().parents[1]


def _concepts() -> list[dict]:
    """Deterministic concepts over the six categories and two outside, with near-duplicate names."""
    out = []
    for ci, cat in enumerate(CATEGORIES + ("flags", "people-body")):
        for si in range(3):
            for k in range(4):
                key = f"{ci:x}{si}{k}"
                # k = 3 is a near-duplicate of k = 0 (same head noun)
                name = f"big item{ci}{si}0" if k == 3 else f"{cat[:3]} item{ci}{si}{k}"
                out.append({"concept": key, "name": name, "category": cat, "subcategory": f"sub{si}",
                            "heldout": k == 2})
    return out


REQUIRED = ("022", "100")  # one held-out, one in the train split


def test_worlds_are_nested_and_start_with_the_required_concepts():
    concepts = _concepts()
    sizes = (4, 9, 20)
    worlds = [choose_world(concepts, n, required=REQUIRED) for n in sizes]
    assert [len(w) for w in worlds] == list(sizes)
    for small, big in zip(worlds, worlds[1:]):
        assert big[: len(small)] == small
    assert [c["concept"] for c in worlds[0][:2]] == list(REQUIRED)
    assert choose_world(concepts, 20, required=REQUIRED) == worlds[-1]  # deterministic


def test_world_rule_keeps_categories_one_head_noun_and_no_other_held_out_concepts():
    concepts = _concepts()
    world = choose_world(concepts, 24, required=REQUIRED)
    by_key = {c["concept"]: c for c in concepts}
    assert {c["category"] for c in world} == set(CATEGORIES)
    nouns = [head_noun(c["name"]) for c in world]
    assert len(nouns) == len(set(nouns))
    assert all(not by_key[c["concept"]]["heldout"] or c["concept"] in REQUIRED for c in world)
    # categories take turns: the first concepts after the required ones come from distinct categories
    turn = [c["category"] for c in world[2 : 2 + len(CATEGORIES)]]
    assert len(set(turn)) == len(CATEGORIES)


def test_world_errors_are_one_line(tmp_path):
    with pytest.raises(DatencoderError, match="only .* concepts pass"):
        choose_world(_concepts(), 10_000, required=REQUIRED)
    with pytest.raises(DatencoderError, match="lacks the world's required"):
        choose_world(_concepts(), 4, required=("nope",))
    with pytest.raises(DatencoderError, match="no world file"):
        read_world(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DatencoderError, match="not a world file"):
        read_world(tmp_path / "bad.json")


def test_data_world_selects_its_concepts_in_every_split_and_only_the_given_styles(tmp_path):
    rows = []
    for key, split in (("a", "train"), ("b", "heldout_concept"), ("c", "train")):
        for style in ("noto", "fluent3d"):
            rows.append({"file": f"images/{style}/{key}_0.png", "concept": key, "style": style,
                         "split": "heldout_style" if style == "fluent3d" and split == "train" else split})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_world(tmp_path / "world.json", [{"concept": k, "name": k, "category": "x", "subcategory": "y"} for k in "ab"])
    assert world_keys(tmp_path / "world.json") == ["a", "b"]
    picked = read_manifest(MiniDataConfig(root=str(tmp_path), world=str(tmp_path / "world.json"), styles=["noto"]))
    assert [(r["concept"], r["style"]) for r in picked] == [("a", "noto"), ("b", "noto")]
    plain = read_manifest(MiniDataConfig(root=str(tmp_path)))
    assert {r["concept"] for r in plain} == {"a", "c"}  # without a world: the train split only
    with pytest.raises(DatencoderError, match="no rows of the world"):
        read_manifest(MiniDataConfig(root=str(tmp_path), world=str(tmp_path / "world.json"), styles=["twemoji"]))


def _quality():
    spec = importlib.util.spec_from_file_location("minisd_quality", ROOT / "benchmarks" / "minisd_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_among_world_ranks_count_only_the_worlds_concepts():
    q = _quality()
    labels = ["a", "b", "c", "d", "e"]
    evaluator = SimpleNamespace(index={"concept": {k: i for i, k in enumerate(labels)}})
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])  # outside the world, "b" and "d" score high
    worlds = {"big": ["a", "c", "e"], "small": ["c", "e"]}
    ranks = q.world_ranks(probs, evaluator, {"concept": "c"}, worlds)
    assert ranks == {"big": 1, "small": 1}  # only "e" beats "c" among the world's concepts
    assert q.world_ranks(probs, evaluator, {"concept": "a"}, worlds) == {"big": 2}  # "a" is not in "small"
    records = [{"concept": "c", "world_ranks": ranks}, {"concept": "e", "world_ranks": {"big": 0, "small": 0}},
               {"concept": "b", "world_ranks": {}}]
    big = q.world_score(records, "big", worlds["big"])
    assert big["n"] == 2 and big["top1"] == 0.5 and big["top5"] == 1.0 and big["mean_rank"] == 0.5


def test_the_world_evaluator_ships_and_reads_the_demo_concepts_in_the_unseen_style():
    from PIL import Image

    from datencoder.emoji.data import compose
    from datencoder.emoji.evaluator import load_evaluator
    from datencoder.io import ASSETS

    evaluator = load_evaluator("evaluator_world")
    assert len(evaluator.labels["concept"]) == 128
    images, keys = [], []
    for file, key in (("red_apple", "1f34e"), ("duck", "1f986"), ("castle", "1f3f0"), ("saxophone", "1f3b7")):
        source = Image.open(ASSETS / "demo" / f"{file}.png").convert("RGBA")
        for size, position, background in (("medium", "center", "blue"), ("small", "top left", "white")):
            images.append(compose(source, size, position, background)[0])
            keys.append(key)
    assert evaluator.predict(images)["concept"]["labels"] == keys
