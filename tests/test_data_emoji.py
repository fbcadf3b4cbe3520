"""Emoji data set: pure helpers and the compose/manifest stage, on fixture images (offline)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from datencoder.emoji.data import (BACKGROUNDS, CANVAS, MARGIN, POSITIONS, SIZES, STYLES,
                                   Concept, compose, dominant_colour, fit_square, key_from_text,
                                   make_caption, normalize_key, sample_compositions,
                                   select_heldout, split_for)
from datencoder.emoji.build import compose_dataset

MANIFEST_KEYS = {"file", "source", "concept", "name", "category", "subcategory", "style", "split",
                 "background", "size", "position", "caption"}


def _fixture(w: int = 90, h: int = 60, colour=(20, 20, 20)) -> Image.Image:
    """An opaque ellipse inside a transparent margin, as a rendered emoji would look."""
    image = Image.new("RGBA", (w + 20, h + 20), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((10, 10, 10 + w - 1, 10 + h - 1), fill=colour + (255,))
    return image


def _visible_box(image: Image.Image, background: str) -> tuple[int, int, int, int]:
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.array(BACKGROUNDS[background])).sum(-1)
    ys, xs = np.nonzero(diff > 30)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("raw, key", [
    ("0023-FE0F-20E3", "23-20e3"), ("1F468-200D-1F4BC", "1f468-1f4bc"), ("00a9-fe0f", "a9"),
    ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f", "1f3f4-e0067-e0062-e0065-e006e-e0067-e007f"),
    ("2764_FE0F_200D_1F525", "2764-1f525"),
])
def test_normalize_key(raw, key):
    assert normalize_key(raw) == key
    assert normalize_key(key) == key


def test_key_from_text_drops_variation_selector():
    assert key_from_text("\u2764\ufe0f") == key_from_text("\u2764") == "2764"
    assert key_from_text("\U0001F468\u200d\U0001F4BC") == "1f468-1f4bc"


def test_fit_square_fills_the_square_and_keeps_aspect():
    out = fit_square(_fixture(90, 60), 64)
    assert out.size == (64, 64) and out.mode == "RGBA"
    x0, y0, x1, y1 = out.getchannel("A").getbbox()
    assert (x0, x1) == (0, 64)
    assert abs((y1 - y0) - 64 * 60 / 90) <= 1 and abs((y0 + y1) / 2 - 32) <= 1


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("position", POSITIONS)
def test_compose_puts_emoji_at_stated_size_and_position(size, position):
    image, box = compose(fit_square(_fixture(), CANVAS), size, position, "yellow")
    assert image.size == (CANVAS, CANVAS) and image.mode == "RGB"
    x0, y0, x1, y1 = _visible_box(image, "yellow")
    assert (x0, y0, x1, y1) == tuple(box)
    assert x0 >= MARGIN and y0 >= MARGIN and x1 <= CANVAS - MARGIN and y1 <= CANVAS - MARGIN
    assert abs(max(x1 - x0, y1 - y0) - SIZES[size]) <= 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    horizontal = "left" if "left" in position else "right" if "right" in position else "center"
    vertical = "top" if "top" in position else "bottom" if "bottom" in position else "center"
    assert {"left": x0 == MARGIN, "right": x1 == CANVAS - MARGIN,
            "center": abs(cx - CANVAS / 2) <= 1}[horizontal]
    assert {"top": y0 == MARGIN, "bottom": y1 == CANVAS - MARGIN,
            "center": abs(cy - CANVAS / 2) <= 1}[vertical]


def test_small_emoji_positions_are_far_apart():
    left = compose(_fixture(), "small", "left", "white")[1]
    right = compose(_fixture(), "small", "right", "white")[1]
    assert right[0] - left[2] >= CANVAS - 2 * SIZES["small"] - 2 * MARGIN - 1


def test_dominant_colour_is_avoided_as_background():
    assert dominant_colour(_fixture(colour=(215, 38, 38))) == "red"
    assert dominant_colour(_fixture(colour=(20, 20, 20))) == "black"
    comps = sample_compositions(0, "1f34e", "noto", "red apple", 200, dominant="red")
    assert "red" not in {c.background for c in comps}
    assert len({c.background for c in comps}) == len(BACKGROUNDS) - 1


def test_captions_mention_only_true_attributes_and_some_are_empty():
    rng = np.random.default_rng(0)
    captions = [make_caption(rng, "red apple", "fluent3d", "small", "top left", "orange")
                for _ in range(2000)]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.07 < empty < 0.13
    allowed = {"red apple", "fluent 3d style", "small", "top left", "on an orange background"}
    for caption in filter(None, captions):
        assert set(caption.split(", ")) <= allowed
    assert "red apple, fluent 3d style, small, top left, on an orange background" in captions
    assert sum("red apple" in c for c in captions) > 0.75 * len(captions)


def test_sample_compositions_is_deterministic_and_seeded():
    a = sample_compositions(3, "1f34e", "noto", "red apple", 8)
    assert a == sample_compositions(3, "1f34e", "noto", "red apple", 8)
    assert a != sample_compositions(4, "1f34e", "noto", "red apple", 8)
    assert a != sample_compositions(3, "1f34e", "twemoji", "red apple", 8)


def _concepts(n_per_category: int = 10) -> list[Concept]:
    return [Concept(f"1f{c}{i:02x}", "?", f"thing {c}{i}", f"cat{c}", f"sub{c}", ("tag",))
            for c in range(3) for i in range(n_per_category)]


def test_select_heldout_is_stratified_and_order_free():
    concepts = _concepts(20)
    heldout = select_heldout(concepts)
    assert heldout == select_heldout(concepts[::-1])
    for c in range(3):
        assert sum(k.startswith(f"1f{c}") for k in heldout) == 2
    assert len(select_heldout(_concepts(3))) == 3  # at least one per category


def test_split_rules():
    assert split_for(True, "noto") == split_for(True, "fluent3d") == "heldout_concept"
    assert split_for(False, "fluent3d") == "heldout_style"
    assert {split_for(False, s) for s in STYLES if s != "fluent3d"} == {"train"}


def _write_sources(root, concepts):
    colours = [(215, 38, 38), (45, 95, 215), (56, 168, 72), (20, 20, 20)]
    for j, style in enumerate(STYLES):
        (root / "sources" / style).mkdir(parents=True)
        for i, c in enumerate(concepts):
            fit_square(_fixture(60 + i, 50, colours[(i + j) % 4])).save(
                root / "sources" / style / f"{c.key}.png")


def test_compose_dataset_manifest_splits_and_determinism(tmp_path):
    concepts = _concepts(4)
    heldout = select_heldout(concepts)
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        _write_sources(tmp_path / name, concepts)
        compose_dataset(tmp_path / name, concepts, heldout, seed, 3, workers=1)
        runs.append((tmp_path / name / "manifest.jsonl").read_text())
    rows = [json.loads(line) for line in runs[0].splitlines()]
    assert len(rows) == len(concepts) * len(STYLES) * 3
    assert all(set(r) == MANIFEST_KEYS for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(r["style"] != "fluent3d" and r["concept"] not in heldout for r in train)
    assert all(r["split"] == "heldout_concept" for r in rows if r["concept"] in heldout)
    assert all((tmp_path / "a" / r["file"]).is_file() for r in rows)
    image = Image.open(tmp_path / "a" / rows[0]["file"])
    assert image.size == (CANVAS, CANVAS) and image.mode == "RGB"
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for r in rows:
        a, b = (tmp_path / run / r["file"] for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    concept_rows = [json.loads(line) for line in (tmp_path / "a" / "concepts.jsonl").open()]
    assert {r["concept"] for r in concept_rows if r["heldout"]} == heldout


def test_compose_dataset_reuses_images_only_with_same_parameters(tmp_path):
    concepts = _concepts(2)
    _write_sources(tmp_path, concepts)
    first = compose_dataset(tmp_path, concepts, set(), 0, 2, workers=1)
    marker = tmp_path / first[0]["file"]
    marker.write_bytes(b"stale")
    compose_dataset(tmp_path, concepts, set(), 0, 2, workers=1)
    assert marker.read_bytes() == b"stale"  # same parameters: reused, not redrawn
    compose_dataset(tmp_path, concepts, set(), 1, 2, workers=1)
    assert Image.open(marker).size == (CANVAS, CANVAS)  # new seed: redrawn
