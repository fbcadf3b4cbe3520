"""Encoder options: the per-sample hypernetworks (factorized, full), their size limit, and tuning
the encoder's heads."""

from __future__ import annotations

import pytest
import torch

from datencoder.attention import AdapterInputs, target_layer_shapes
from datencoder.base import load_base
from datencoder.encoder import HEAD_LIMIT_FLOOR, head_weight_counts
from datencoder.hypernetwork import MODES, TUNED_BY_HEADS, Hypernetwork, weight_counts
from datencoder.io import load_tensors
from datencoder.config import Config, EncoderConfig, TuneConfig, from_dict, to_dict
from datencoder.errors import DatencoderError
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize

from test_core import make_system, unet_inputs


@pytest.fixture(scope="module")
def full_system(tiny_base_dir):
    return make_system(tiny_base_dir, encoder={"hypernet_mode": "full"})


@pytest.fixture(scope="module")
def factorized_system(tiny_base_dir):
    return make_system(tiny_base_dir, encoder={"hypernet_mode": "factorized", "basis_dim": 6, "code_dim": 8})


def _pixels(system, n=1, seed=0):
    size = system.base.resolution
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_factorized_is_the_default_mode():
    assert EncoderConfig().hypernet_mode == "factorized" and MODES[0] == "factorized"


@pytest.mark.parametrize("mode", ["factorized", "full"])
def test_untrained_per_sample_hypernetwork_leaves_unet_bit_identical(tiny_base_dir, mode, request):
    system = request.getfixturevalue(f"{mode}_system")
    vanilla = load_base(str(tiny_base_dir)).freeze()
    latents, t, states = unet_inputs(vanilla)
    with torch.no_grad():
        expected = vanilla.unet(latents, t, states).sample
        out = system.predict(_pixels(system, 2), torch.Generator().manual_seed(0))
        assert all(torch.count_nonzero(B) == 0 for _, B in out.factors.values())
        for hard in (None, states):
            got = system.base.unet(latents, t, states, cross_attention_kwargs={"adapter": AdapterInputs(
                factors=out.factors, hard_states=hard, blend_self=0.3, blend_cross=0.6)}).sample
            assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["factorized", "full"])
def test_per_sample_hypernetwork_predicts_per_sample_a_and_b(mode, request):
    system = request.getfixturevalue(f"{mode}_system")
    hyper = system.encoder.hypernetwork
    saved = {k: v.clone() for k, v in hyper.state_dict().items()}
    try:
        with torch.no_grad():
            for name, p in hyper.named_parameters():  # the zero-initialised maps made non-zero
                if name.split(".")[0] in TUNED_BY_HEADS[mode] and name.split(".")[0] != "A":
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            h = torch.randn(3, system.cfg.encoder.hidden_dim, generator=torch.Generator().manual_seed(2))
            batch = hyper(h)
            for name, (A, B) in batch.items():
                fan_in, fan_out = hyper.shapes[hyper.names.index(name)]
                assert A.shape == (3, 4, fan_in) and B.shape == (3, fan_out, 4)
                assert not torch.equal(A[0], A[1]) and not torch.equal(B[0], B[1])  # A varies too, unlike core
                one = hyper(h[1:2])[name]  # a batch equals its samples one by one
                torch.testing.assert_close(one[0][0], A[1])
                torch.testing.assert_close(one[1][0], B[1])
    finally:
        hyper.load_state_dict(saved)
    with pytest.raises(DatencoderError, match="hypernet_mode"):
        EncoderConfig(hypernet_mode="huge")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("predict", [True, False])
def test_weight_counts_match_the_built_hypernetwork(factorized_system, mode, predict):
    hyper = factorized_system.encoder.hypernetwork
    shapes = dict(zip(hyper.names, hyper.shapes))
    built = Hypernetwork(shapes, 12, 3, predict=predict, mode=mode, basis_dim=5, code_dim=7)
    parts: dict[str, int] = {}
    for name, p in built.named_parameters():
        parts[name.split(".")[0]] = parts.get(name.split(".")[0], 0) + p.numel()
    assert weight_counts(shapes, 12, 3, predict, mode, basis_dim=5, code_dim=7) == parts


def test_factorized_head_does_not_grow_with_hidden_width(factorized_system):
    hyper = factorized_system.encoder.hypernetwork
    shapes = dict(zip(hyper.names, hyper.shapes))
    grow = {mode: sum(weight_counts(shapes, 2048, 4, mode=mode).values()) -
            sum(weight_counts(shapes, 1024, 4, mode=mode).values()) for mode in MODES}
    assert grow["full"] == 1024 * 4 * sum(i + o for i, o in shapes.values())
    assert grow["factorized"] == 1024 * 128  # only the shared code map reads h


def test_a_hypernetwork_past_the_limit_is_refused_before_anything_is_built(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    tokens = len(base.tokenizer)
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hypernet_mode": "full", "hidden_dim": 4096}})
    count = sum(head_weight_counts(cfg.encoder, target_layer_shapes(base.unet)).values())
    assert count > HEAD_LIMIT_FLOOR
    with pytest.raises(DatencoderError) as err:
        EncoderSystem(base, cfg)
    message = str(err.value)
    assert "\n" not in message and f"{count:,}" in message and "max_head_fraction" in message
    assert len(base.tokenizer) == tokens  # refused before the placeholder token was even added
    with pytest.raises(DatencoderError, match="max_head_fraction"):
        EncoderConfig(max_head_fraction=0)


def test_full_mode_saves_and_loads(full_system, tmp_path):
    full_system.save(tmp_path / "enc")
    loaded = EncoderSystem.load(tmp_path / "enc", full_system.base)
    assert loaded.cfg.encoder.hypernet_mode == "full"
    assert all(torch.equal(v, loaded.encoder.state_dict()[k]) for k, v in full_system.encoder.state_dict().items())


@pytest.mark.parametrize("name, mode", [("minisd-emoji-encoder", "factorized"), ("minisd-emoji-encoder-v1", "full"),
                                        ("minisd-emoji-encoder-basis", "core")])
def test_shipped_encoders_still_load_unchanged(name, mode):
    from datencoder.system import SHIPPED_ENCODERS

    folder = SHIPPED_ENCODERS[name]
    if not (folder / "encoder.json").exists():
        pytest.skip("the embedded encoder is not shipped in this checkout")
    system = EncoderSystem.load(folder)
    assert system.cfg.encoder.hypernet_mode == mode and not system.cfg.tune.tune_heads
    shipped = load_tensors(folder / "encoder.safetensors", "encoder")
    state = system.encoder.state_dict()
    assert set(shipped) == set(state)
    assert all(torch.equal(shipped[k].float(), state[k].float()) for k in shipped)


@pytest.fixture(scope="module", params=["factorized", "core"])
def trained_system(tiny_base_dir, request):
    """A tiny system whose heads predict non-zero offsets, as a pre-trained one does."""
    system = make_system(tiny_base_dir, encoder={"hypernet_mode": request.param})
    hyper = system.encoder.hypernetwork
    with torch.no_grad():
        (hyper.maps if request.param == "factorized" else hyper.core).weight.normal_(
            0, 0.05, generator=torch.Generator().manual_seed(3))
    return system


def test_tune_heads_with_zero_steps_returns_the_prediction(trained_system):
    pixels = _pixels(trained_system)[0]
    plain = personalize(trained_system, pixels, TuneConfig(steps=0))
    heads = personalize(trained_system, pixels, TuneConfig(steps=0, tune_heads=True))
    assert torch.equal(plain.embedding, heads.embedding) and plain.hard_word == heads.hard_word
    assert plain.factors.keys() == heads.factors.keys()
    assert all(torch.equal(plain.factors[k][0], heads.factors[k][0]) and
               torch.equal(plain.factors[k][1], heads.factors[k][1]) for k in plain.factors)


def test_tune_heads_moves_a_copy_and_keeps_the_concept_format(trained_system, tmp_path):
    from datencoder.concept import Concept

    before = {k: v.clone() for k, v in trained_system.encoder.state_dict().items()}
    pixels = _pixels(trained_system)[0]
    start = personalize(trained_system, pixels, TuneConfig(steps=0))
    trained_system.encoder.zero_grad(set_to_none=True)
    tuned = personalize(trained_system, pixels, TuneConfig(steps=2, batch_size=2, tune_heads=True, lr_heads=1e-2))
    assert all(torch.equal(v, before[k]) for k, v in trained_system.encoder.state_dict().items())
    assert all(p.grad is None for p in trained_system.encoder.parameters())  # no gradient reached it
    assert not torch.equal(tuned.embedding, start.embedding)
    assert any(not torch.equal(tuned.factors[k][1], start.factors[k][1]) for k in start.factors)
    assert all(tuned.factors[k][0].shape == start.factors[k][0].shape for k in start.factors)
    loaded = Concept.load(tuned.save(tmp_path / "c"), trained_system.base)
    assert torch.equal(loaded.embedding, tuned.embedding) and loaded.factors.keys() == tuned.factors.keys()
    # the settings it was tuned with (the call's TuneConfig), not the system's cfg.tune
    assert trained_system.cfg.tune.tune_heads is False
    assert loaded.config["tune"] == to_dict(TuneConfig(steps=2, batch_size=2, tune_heads=True, lr_heads=1e-2))
    with pytest.raises(DatencoderError, match="lr_heads"):
        from_dict(Config, {"tune": {"lr_heads": 0}})


def test_tune_heads_tunes_the_heads_not_the_encoder(trained_system):
    encoder = trained_system.encoder
    mode = trained_system.cfg.encoder.hypernet_mode
    tuned = encoder.tunable_heads()
    parts = {name.split(".")[1] if name.startswith("hypernetwork.") else name.split(".")[0] for name in tuned}
    assert parts == {"embedding_head", *TUNED_BY_HEADS[mode]}
    counts = head_weight_counts(trained_system.cfg.encoder, dict(zip(encoder.hypernetwork.names,
                                                                     encoder.hypernetwork.shapes)))
    size = sum(t.numel() for t in tuned.values())
    assert size == sum(p.numel() for p in encoder.embedding_head.parameters()) + sum(
        counts[part] for part in TUNED_BY_HEADS[mode])
    assert size < sum(p.numel() for p in encoder.parameters())  # never the trunk
    if mode == "factorized":  # its per-layer bases stay shared
        assert not {"A", "U", "V"} & parts
    assert set(encoder.tunable_heads(embedding=False)) == {n for n in tuned if n.startswith("hypernetwork.")}
    assert all(t.requires_grad and t.is_leaf for t in tuned.values())
