"""The dual path's vanilla path is the base model, on every family.

METHOD.md, "Dual path": out = a * Attn(W + dW, soft) + (1 - a) * Attn(W, hard). At a = 0 a concept
must therefore give exactly what the plain base gives on the hard prompt, in the objective and in
generation. SDXL adds the pooled text to the time embedding, which both paths and every resnet
share: with ``dual_path.pooled: hard`` (the default) that vector is the hard prompt's, so the
invariant holds there too; the soft prompt's pooled vector carries v and moves every output.
"""

from __future__ import annotations

import pytest
import torch

from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.conditioning import added_cond_kwargs, encode_text, pooled_text
from datencoder.config import DualPathConfig
from datencoder.errors import DatencoderError
from datencoder.pipeline import ConceptPipeline

from test_core import make_system, random_factors

PROMPTS = ["a photo of S*", "S* on the beach", "a red S* in the snow"]


@pytest.fixture(scope="module", params=["bert", "clip", "sd2", "sdxl"])
def bases(request, tiny_base_dir, tiny_clip_base_dir, tiny_sd2_base_dir, tiny_sdxl_base_dir):
    """(system at a = 0 with the default dual_path.pooled, the plain base of the same folder)."""
    base_dir = {"bert": tiny_base_dir, "clip": tiny_clip_base_dir, "sd2": tiny_sd2_base_dir,
                "sdxl": tiny_sdxl_base_dir}[request.param]
    system = make_system(base_dir, dual_path={"blend_self": 0.0, "blend_cross": 0.0})
    assert system.cfg.dual_path.pooled == "hard"
    return system, load_base(str(base_dir), with_image_tower=False).freeze()


def _inputs(system, seed=0):
    """A random embedding near a real word, [1, D], and non-zero factors {key: (A [1, r, in], B [1, out, r])}."""
    g = torch.Generator().manual_seed(seed)
    table = system.vocab_table
    embedding = table[torch.randint(0, len(table), (1,), generator=g)] + 0.1 * torch.randn(1, table.shape[1], generator=g)
    return embedding, random_factors(system, 1, seed=seed)


def _concept(system, pooled="hard", blend=0.0) -> Concept:
    embedding, factors = _inputs(system)
    return Concept(embedding=embedding[0], factors={k: (A[0], B[0]) for k, (A, B) in factors.items()},
                   hard_word=system.objective.hard_words(embedding)[0], token=system.cfg.model.token,
                   blend_self=blend, blend_cross=blend, pooled=pooled, token_dims=system.base.token_dims,
                   base={"name": system.base.name, "fingerprint": system.base.fingerprint})


def _noisy(system, rows):
    g = torch.Generator().manual_seed(1)
    c, size = system.base.unet.config.in_channels, system.base.unet.config.sample_size
    return system.objective.add_noise(torch.randn(rows, c, size, size, generator=g), g,
                                      torch.tensor([40, 400, 900][:rows]))


def test_objective_at_a_zero_is_the_plain_unet_on_the_hard_prompt(bases):
    system, plain = bases
    embedding, factors = _inputs(system)
    batch = _noisy(system, len(PROMPTS))
    word = system.objective.hard_words(embedding)[0]
    with torch.no_grad():
        got = system.objective.predict(batch, PROMPTS, embedding, factors, True)
        text = encode_text(plain, [p.replace("S*", word) for p in PROMPTS])
        expected = plain.unet(batch.noisy, batch.timesteps, text.states,
                              added_cond_kwargs=added_cond_kwargs(plain, text)).sample
        single = system.objective.predict(batch, PROMPTS, embedding, factors, False)
    assert torch.equal(got, expected)
    assert not torch.allclose(single, expected, atol=1e-4)  # the concept does act on the soft path


def test_concept_at_a_zero_generates_the_plain_base_on_the_hard_prompt(bases):
    system, plain = bases
    concept = _concept(system)
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="latent")
    got = ConceptPipeline(system.base, concept)("S* on the beach", **kwargs).images
    expected = ConceptPipeline(plain)(f"{concept.hard_word} on the beach", **kwargs).images
    assert torch.equal(got, expected)


def test_sdxl_pooled_choice_decides_whether_the_vanilla_path_is_vanilla(tiny_sdxl_base_dir):
    system = make_system(tiny_sdxl_base_dir, dual_path={"blend_self": 0.0, "blend_cross": 0.0})
    plain = load_base(str(tiny_sdxl_base_dir), with_image_tower=False).freeze()
    kwargs = dict(num_images_per_prompt=1, num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="latent")
    latents = {}
    for pooled in ("hard", "blend", "soft"):
        concept = _concept(system, pooled)
        latents[pooled] = ConceptPipeline(system.base, concept)("S* on the beach", **kwargs).images
    expected = ConceptPipeline(plain)(f"{concept.hard_word} on the beach", **kwargs).images
    assert torch.equal(latents["hard"], expected) and torch.equal(latents["blend"], expected)  # blend at a = 0
    assert (latents["soft"] - expected).abs().max() > 1e-5  # v reaches the time embedding


def test_pooled_blend_formula_and_choices():
    soft, hard = torch.tensor([[1.0, 3.0]]), torch.tensor([[-1.0, 1.0]])
    assert torch.equal(pooled_text(soft, hard, "blend", 0.25), torch.tensor([[-0.5, 1.5]]))  # a soft + (1 - a) hard
    assert pooled_text(soft, hard, "hard", 0.25) is hard and pooled_text(soft, hard, "soft", 0.25) is soft
    assert pooled_text(soft, None, "hard", 0.0) is soft  # single path: the soft prompt's
    with pytest.raises(DatencoderError, match="dual_path.pooled must be one of"):
        DualPathConfig(pooled="mean")


def test_concept_records_its_pooled_choice(tiny_sdxl_base_dir, tmp_path):
    system = make_system(tiny_sdxl_base_dir, dual_path={"pooled": "blend"})
    concept = _concept(system, "blend", 0.5)
    assert Concept.load(concept.save(tmp_path / "c"), system.base).pooled == "blend"
