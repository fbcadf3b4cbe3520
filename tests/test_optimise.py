"""The one step loop (``tuning.optimise_on_image``): personalisation and the baselines run exactly
the documented step, checked against hand-written reference loops on the tiny model."""

from __future__ import annotations

import pytest
import torch

from datencoder.augment import augment_views
from datencoder.base import load_base
from datencoder.config import Config, from_dict
from datencoder.eval.baselines import TextualInversionConfig, textual_inversion
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize


def _pixels(base, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, base.resolution, base.resolution, generator=g) * 2 - 1


def _reference_steps(objective, base, pixels, steps, batch_size, templates, hflip, scale_min, embedding, factors,
                     dual, lr_groups, gen):
    """The step written out by hand: views, latents, noise, templates, loss, Adam."""
    optimizer = torch.optim.Adam(lr_groups)
    for _ in range(steps):
        views = augment_views(pixels, batch_size, gen, hflip, scale_min)
        with torch.no_grad():
            vae = base.vae
            latents = vae.encode(views).latent_dist.sample(generator=gen)
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * vae.config.scaling_factor).float()
        batch = objective.add_noise(latents, gen)
        picks = torch.randint(0, len(templates), (batch_size,), generator=gen).tolist()
        loss = sum(objective(batch, [templates[i] for i in picks], embedding, factors, dual, gen).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_textual_inversion_is_the_reference_loop(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    pixels = _pixels(base)
    tcfg = TextualInversionConfig(steps=2, batch_size=2, lr=0.05, init_word=None, seed=3)
    concept = textual_inversion(base, pixels, tcfg)
    # the reference: the same objective (read back from the run), from the vocabulary mean
    from datencoder.conditioning import text_vocabulary
    from datencoder.objective import Objective
    from datencoder.prepare import prepare_base

    cfg = from_dict(Config, {k: v for k, v in concept.config.items() if k != "baseline"})
    vocab_ids, table = text_vocabulary(base, cfg.loss.whole_words_only)
    objective = Objective(base, cfg, prepare_base(base, cfg.model.token).token_id, vocab_ids, table)
    embedding = table.mean(0).clone().unsqueeze(0).requires_grad_()
    _reference_steps(objective, base, pixels, 2, 2, tcfg.templates, tcfg.hflip, tcfg.scale_min, embedding, {}, False,
                     [{"params": [embedding], "lr": tcfg.lr}], torch.Generator().manual_seed(tcfg.seed))
    assert torch.equal(concept.embedding, embedding.detach()[0])
    assert not torch.equal(concept.embedding, table.mean(0))  # the steps moved it


@pytest.mark.parametrize("dual", [True, False])
def test_personalize_is_the_reference_loop(tiny_base_dir, dual):
    base = load_base(str(tiny_base_dir))
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hidden_dim": 32},
                             "dual_path": {"enabled": dual},
                             "tune": {"steps": 2, "batch_size": 3, "seed": 1, "lr_embedding": 0.01, "lr_lora": 0.02}})
    torch.manual_seed(0)
    system = EncoderSystem(base, cfg)
    pixels = _pixels(base)
    concept = personalize(system, pixels)

    gen = torch.Generator().manual_seed(cfg.tune.seed)
    pred = system.predict(pixels.unsqueeze(0), gen)
    embedding = pred.embedding.detach().clone().requires_grad_()
    factors = {k: (A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()) for k, (A, B) in pred.factors.items()}
    lora = [t for pair in factors.values() for t in pair]
    _reference_steps(system.objective, base, pixels, 2, 3, cfg.data.templates, cfg.data.hflip, cfg.data.scale_min,
                     embedding, factors, dual, [{"params": [embedding], "lr": 0.01}, {"params": lora, "lr": 0.02}],
                     gen)
    assert torch.equal(concept.embedding, embedding.detach()[0])
    assert concept.factors.keys() == factors.keys()
    for key, (A, B) in factors.items():
        assert torch.equal(concept.factors[key][0], A.detach()[0]) and torch.equal(concept.factors[key][1], B.detach()[0])
    assert not torch.equal(concept.embedding, pred.embedding[0])
