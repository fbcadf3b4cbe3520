"""Encoder options: the full hypernetwork (per-sample A and B) and tuning the encoder's heads."""

from __future__ import annotations

import pytest
import torch

from datencoder.attention import AdapterInputs
from datencoder.base import load_base
from datencoder.io import load_tensors
from datencoder.config import Config, EncoderConfig, TuneConfig, from_dict, to_dict
from datencoder.errors import DatencoderError
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize

from test_core import make_system, unet_inputs


@pytest.fixture(scope="module")
def full_system(tiny_base_dir):
    return make_system(tiny_base_dir, encoder={"hypernet_mode": "full"})


def _pixels(system, n=1, seed=0):
    size = system.base.resolution
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_untrained_full_hypernetwork_leaves_unet_bit_identical(tiny_base_dir, full_system):
    vanilla = load_base(str(tiny_base_dir)).freeze()
    latents, t, states = unet_inputs(vanilla)
    with torch.no_grad():
        expected = vanilla.unet(latents, t, states).sample
        out = full_system.predict(_pixels(full_system, 2), torch.Generator().manual_seed(0))
        assert all(torch.count_nonzero(B) == 0 for _, B in out.factors.values())
        for hard in (None, states):
            got = full_system.base.unet(latents, t, states, cross_attention_kwargs={"adapter": AdapterInputs(
                factors=out.factors, hard_states=hard, blend_self=0.3, blend_cross=0.6)}).sample
            assert torch.equal(got, expected)


def test_full_hypernetwork_predicts_per_sample_a_and_b(full_system):
    hyper = full_system.encoder.hypernetwork
    with torch.no_grad():
        for p in (hyper.a_head, hyper.b_head):
            p.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        h = torch.randn(3, full_system.cfg.encoder.hidden_dim, generator=torch.Generator().manual_seed(2))
        batch = hyper(h)
        for name, (A, B) in batch.items():
            fan_in, fan_out = hyper.shapes[hyper.names.index(name)]
            assert A.shape == (3, 4, fan_in) and B.shape == (3, fan_out, 4)
            assert not torch.equal(A[0], A[1]) and not torch.equal(B[0], B[1])  # A varies too, unlike core
            one = hyper(h[1:2])[name]  # a batch equals its samples one by one
            torch.testing.assert_close(one[0][0], A[1])
            torch.testing.assert_close(one[1][0], B[1])
        for p in (hyper.a_head, hyper.b_head):
            p.weight.zero_()
    with pytest.raises(DatencoderError, match="hypernet_mode"):
        EncoderConfig(hypernet_mode="huge")


def test_full_mode_saves_and_loads(full_system, tmp_path):
    full_system.save(tmp_path / "enc")
    loaded = EncoderSystem.load(tmp_path / "enc", full_system.base)
    assert loaded.cfg.encoder.hypernet_mode == "full"
    assert all(torch.equal(v, loaded.encoder.state_dict()[k]) for k, v in full_system.encoder.state_dict().items())


@pytest.mark.parametrize("name, mode", [("minisd-emoji-encoder", "full"), ("minisd-emoji-encoder-basis", "core")])
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


@pytest.fixture(scope="module")
def trained_system(tiny_base_dir):
    """A tiny system whose heads predict non-zero offsets, as a pre-trained one does."""
    system = make_system(tiny_base_dir)
    with torch.no_grad():
        system.encoder.hypernetwork.core.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
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
    tuned = personalize(trained_system, pixels, TuneConfig(steps=2, batch_size=2, tune_heads=True, lr_heads=1e-2))
    assert all(torch.equal(v, before[k]) for k, v in trained_system.encoder.state_dict().items())
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
