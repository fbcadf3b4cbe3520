"""The dual path on the batch shapes real tuning has: one concept, B prompts, real token lengths.

During tuning one embedding (N = 1) serves a batch of B augmented views with different prompt
templates. Every row must see its own hard prompt. The tiny bases keep the real sequence lengths
(32 for the MiniLM default, 77 for CLIP) and B = 3 divides neither, so a reshape that folded one
prompt's tokens into several rows would fail loudly instead of passing silently. Every family is
covered: SD 1.x (BERT and CLIP text), SD 2.x (v-prediction) and SDXL (two text encoders, pooled
text in the time embedding).
"""

from __future__ import annotations

import pytest
import torch

from datencoder.attention import AdapterInputs
from datencoder.conditioning import added_cond_kwargs, encode_text
from datencoder.errors import DatencoderError
from datencoder.objective import NoisyLatents
from datencoder.testing import MAX_LENGTHS
from datencoder.tuning import personalize

from test_core import make_system, random_factors

PROMPTS = ["a photo of S*", "S* on the beach", "a red S* in the snow"]


@pytest.fixture(scope="module", params=["bert", "clip", "sd2", "sdxl"])
def system(request, tiny_base_dir, tiny_clip_base_dir, tiny_sd2_base_dir, tiny_sdxl_base_dir):
    base_dir = {"bert": tiny_base_dir, "clip": tiny_clip_base_dir, "sd2": tiny_sd2_base_dir,
                "sdxl": tiny_sdxl_base_dir}[request.param]
    system = make_system(base_dir, dual_path={"blend_self": 0.5, "blend_cross": 0.5})
    for tokenizer, _ in system.base.text_encoders:
        assert tokenizer.model_max_length == MAX_LENGTHS["bert" if request.param == "bert" else "clip"]
    assert system.base.is_sdxl == (request.param == "sdxl")
    return system


def _batch(system, rows: int, seed: int = 0) -> NoisyLatents:
    g = torch.Generator().manual_seed(seed)
    c, size = system.base.unet.config.in_channels, system.base.unet.config.sample_size
    latents = torch.randn(rows, c, size, size, generator=g)
    return system.objective.add_noise(latents, g, torch.tensor([40, 400, 900][:rows]))


def _concept(system, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = system.vocab_table
    embedding = table[torch.randint(0, len(table), (1,), generator=g)] + 0.1 * torch.randn(1, table.shape[1], generator=g)
    return embedding, random_factors(system, 1, seed=seed)


def _rows(batch: NoisyLatents, i: int) -> NoisyLatents:
    return NoisyLatents(*(x[i:i + 1] for x in (batch.latents, batch.noise, batch.timesteps, batch.noisy)))


def test_lengths_are_not_divided_by_the_test_batch():
    assert all(n % len(PROMPTS) for n in MAX_LENGTHS.values())


def test_hard_prompt_states_have_one_row_per_prompt(system):
    embedding, _ = _concept(system)
    word = system.objective.hard_words(embedding)[0]
    hard = system.objective.hard_states(PROMPTS, [word])
    expected = encode_text(system.base, [p.replace("S*", word) for p in PROMPTS]).states
    assert hard.shape == (len(PROMPTS), system.base.tokenizer.model_max_length, expected.shape[-1])
    torch.testing.assert_close(hard, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dual_path", [True, False])
def test_one_concept_with_a_batch_of_prompts_equals_each_row_alone(system, dual_path):
    embedding, factors = _concept(system)
    batch = _batch(system, len(PROMPTS))
    with torch.no_grad():
        together = system.objective.predict(batch, PROMPTS, embedding, factors, dual_path)
        for i, prompt in enumerate(PROMPTS):
            alone = system.objective.predict(_rows(batch, i), [prompt], embedding, factors, dual_path)
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        # the loss of the batch is the mean of the rows' losses
        terms = system.objective(batch, PROMPTS, embedding, factors, dual_path)
        rows = [system.objective(_rows(batch, i), [p], embedding, factors, dual_path)["diffusion"]
                for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(terms["diffusion"], torch.stack(rows).mean(), rtol=1e-5, atol=1e-6)


def test_the_dual_path_sees_each_rows_own_hard_prompt(system, monkeypatch):
    """Only the hard prompt differs between the rows: each row equals its own hard prompt alone.

    One embedding, one prompt template, one noisy latent in every row, so the soft path is the same
    in all of them; the hard word differs per row. A vanilla path that gave every row row 0's hard
    prompt would make rows 1 and 2 equal to row 0 instead of to their own prompts.
    """
    embedding, factors = _concept(system)
    words = ["dog", "cat", "car"]
    prompts = ["a photo of S*"] * len(words)
    batch = _batch(system, 1)
    batch = NoisyLatents(*(x.expand(len(words), *x.shape[1:]) for x in
                           (batch.latents, batch.noise, batch.timesteps, batch.noisy)))
    objective = system.objective
    with torch.no_grad():
        monkeypatch.setattr(objective, "hard_words", lambda _: words)
        together = objective.predict(batch, prompts, embedding, factors, True)
        for i, word in enumerate(words):
            monkeypatch.setattr(objective, "hard_words", lambda _, word=word: [word])
            alone = objective.predict(_rows(batch, i), prompts[:1], embedding, factors, True)
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # the hard prompts do move the output: the rows differ by far more than the tolerance above
    assert min((together[i] - together[j]).abs().max() for i, j in ((0, 1), (1, 2), (0, 2))) > 1e-3


def test_processor_refuses_a_context_with_another_batch(system):
    embedding, factors = _concept(system)
    batch = _batch(system, len(PROMPTS))
    unet = system.base.unet
    soft = system.objective.soft_text(PROMPTS, embedding).states
    hard_one_row = system.objective.hard_states(PROMPTS[:1], system.objective.hard_words(embedding))
    added = added_cond_kwargs(system.base, system.objective.soft_text(PROMPTS, embedding))
    with torch.no_grad(), pytest.raises(DatencoderError, match="text context has 1 rows but the hidden states have 3"):
        unet(batch.noisy, batch.timesteps, soft, cross_attention_kwargs={"adapter": AdapterInputs(
            factors, hard_one_row, 0.5, 0.5)}, added_cond_kwargs=added)
    with pytest.raises(DatencoderError, match="multiple of the embedding batch"):
        system.objective.hard_states(PROMPTS, ["dog", "cat"])


def test_tuning_runs_on_batches_that_divide_nothing_and_lowers_its_loss(system):
    """Tuning with the dual path on a batch of 3 views: finite, and the loss on fixed noise falls."""
    res = system.base.resolution
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    pixels = torch.stack([xx, yy, xx * yy])
    tune = system.cfg.tune
    eval_batch = NoisyLatents(*(x for x in _eval_batch(system, pixels)))

    def eval_loss(concept) -> float:
        with torch.no_grad():
            return float(system.objective(eval_batch, PROMPTS, concept.embedding.unsqueeze(0),
                                          concept.batched_factors(), True)["diffusion"])

    before = eval_loss(personalize(system, pixels, tune.__class__(**{**vars(tune), "steps": 0})))
    losses = []
    cfg = tune.__class__(**{**vars(tune), "steps": 20, "batch_size": 3, "lr_embedding": 3e-2, "lr_lora": 3e-2})
    concept = personalize(system, pixels, cfg, callback=lambda s, t: losses.append(t["diffusion"]))
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert eval_loss(concept) < 0.95 * before


def _eval_batch(system, pixels):
    gen = torch.Generator().manual_seed(123)
    latents = system.encode_latents(pixels.unsqueeze(0).expand(len(PROMPTS), -1, -1, -1), gen)
    b = system.objective.add_noise(latents, gen, torch.tensor([100, 500, 900]))
    return b.latents, b.noise, b.timesteps, b.noisy
