"""The measuring evaluator: canonicalisation, save/load, and the shipped weights on real emoji."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import datencoder
from datencoder.emoji.data import compose
from datencoder.errors import DatencoderError
from datencoder.emoji.evaluator import HEADS, EvaluatorArch, EvaluatorNet, images_to_tensor, load_evaluator, locate, save_evaluator

FIXTURES = Path(__file__).parent / "fixtures"
SHIPPED = Path(datencoder.__file__).parent / "assets" / "evaluator"
EMOJI = [("noto_1f34e.png", "1f34e"), ("twemoji_1f600.png", "1f600"), ("openmoji_1f697.png", "1f697")]
needs_weights = pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(),
                                   reason="evaluator weights not trained yet (datencoder minisd evaluator)")


def _composed(name: str, size="large", position="center", background="white") -> Image.Image:
    return compose(Image.open(FIXTURES / name), size, position, background)[0]


def test_locate_finds_the_pasted_emoji():
    image, (x0, y0, x1, y1) = compose(Image.open(FIXTURES / "noto_1f34e.png"), "small", "top left", "blue")
    bg, box = locate(images_to_tensor([image], 64), threshold=0.12)
    assert torch.allclose(bg[0], torch.tensor([45, 95, 215]) / 127.5 - 1, atol=0.01)
    # The 3x3 mean filter may widen the box by one pixel on each side.
    assert (box[0] - torch.tensor([x0, y0, x1 - 1, y1 - 1], dtype=torch.float)).abs().max() <= 1


@pytest.mark.parametrize("prototypes,proto_style", [(0, False), (2, False), (2, True)])
def test_save_load_round_trip(tmp_path, prototypes, proto_style):
    arch = EvaluatorArch(stem_channels=4, widths=[8, 8], global_widths=[4, 4], layout_hidden=8, embed_dim=8,
                         prototypes_per_concept=prototypes, prototype_style=proto_style)
    labels = {"concept": ["a", "b", "c"], "style": ["s1", "s2"], "background": ["white", "blue"],
              "position": ["center", "left"], "size": ["small", "large"]}
    net = EvaluatorNet(arch, {h: len(v) for h, v in labels.items()}).eval()
    net.prototypes.copy_(torch.nn.functional.normalize(torch.randn(net.prototypes.shape), dim=-1))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_evaluator(net, labels, tmp_path)
    loaded = load_evaluator(tmp_path)
    with torch.no_grad():
        ref, ref_emb = net(x)
    out, emb = loaded.logits(x)
    for h in HEADS:  # weights are stored in fp16
        assert torch.allclose(out[h], ref[h], atol=0.05), h
    assert torch.allclose(emb, ref_emb, atol=0.01)
    assert loaded.labels == labels
    if prototypes:  # the concept score is the best match over a concept's prototypes
        cos = emb @ loaded.net.prototypes.flatten(0, 1).t()  # [2, 3 * prototypes]
        expected = arch.concept_scale * cos.view(2, 3, prototypes).amax(-1)
        assert torch.allclose(out["concept"], expected, atol=1e-4)
    if proto_style:  # ... and the style score the best match over every concept of that style
        expected = arch.concept_scale * cos.view(2, 3, prototypes).amax(1)
        assert torch.allclose(out["style"], expected, atol=1e-4)


def test_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(DatencoderError, match="datencoder minisd evaluator"):
        load_evaluator(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    return load_evaluator()


@needs_weights
def test_shipped_recognises_each_concept_above_the_others(shipped):
    images = [_composed(name) for name, _ in EMOJI]
    probs = shipped.predict(images)["concept"]["probs"]  # [3, num_concepts]
    cols = [shipped.index["concept"][key] for _, key in EMOJI]
    for i in range(len(EMOJI)):
        for j in range(len(EMOJI)):
            if i != j:
                assert probs[i, cols[i]] > probs[i, cols[j]], (EMOJI[i], EMOJI[j])


@needs_weights
def test_shipped_reads_layout(shipped):
    pred = shipped.predict([_composed("noto_1f34e.png", "small", "top left", "blue"),
                            _composed("twemoji_1f600.png", "large", "center", "green")])
    assert pred["background"]["labels"] == ["blue", "green"]
    assert pred["position"]["labels"] == ["top left", "center"]
    assert pred["size"]["labels"] == ["small", "large"]
    assert torch.allclose(pred["style"]["probs"].sum(-1), torch.ones(2), atol=1e-5)


@needs_weights
def test_shipped_embedding_tracks_identity(shipped):
    apple_white = _composed("noto_1f34e.png", background="white")
    apple_pink = _composed("noto_1f34e.png", "medium", "left", "pink")
    face = _composed("twemoji_1f600.png", background="white")
    emb = shipped.embed([apple_white, apple_pink, face, apple_white])
    assert emb.shape == (4, shipped.net.arch.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-4)
    assert torch.allclose(emb[0], emb[3])
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
