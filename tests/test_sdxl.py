"""SDXL (two text encoders, pooled text + size ids in the time embedding) and SD 2.x end to end.

The tiny SDXL model (``build_tiny_base(family="sdxl")``) has SDXL's block structure at small
widths and two CLIP text encoders of widths 32 and 48 (pooled projection 40), so a part of S*
sent to the wrong encoder or a pooled vector from the wrong one fails on shape. The batch
invariants (a batch of prompts equals its rows, the processor's batch check) run over SDXL and
SD 2.x in tests/test_dual_path_batches.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from datencoder.attention import AdapterInputs
from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.config import shipped_configs_dir
from datencoder.conditioning import added_cond_kwargs, encode_text
from datencoder.export import EMBEDDING_FILE, LORA_FILE, export_concept
from datencoder.pipeline import ConceptPipeline
from datencoder.recipes import cli

from test_core import make_system
from test_export import _random_concept

PROMPTS = ["a photo of a red dog", "a cat on the beach", "an apple"]


@pytest.fixture(scope="module")
def system(tiny_sdxl_base_dir):
    return make_system(tiny_sdxl_base_dir, dual_path={"blend_self": 0.5, "blend_cross": 0.5})


def test_sdxl_base_loads_both_text_encoders_and_encodes_like_stock(tiny_sdxl_base_dir):
    base = load_base(str(tiny_sdxl_base_dir), with_image_tower=False)
    assert base.is_sdxl and base.token_dims == (32, 48)
    assert base.unet.config.cross_attention_dim == sum(base.token_dims)
    stock = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_base_dir))
    states, _, pooled, _ = stock.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    got = encode_text(base, PROMPTS)
    assert got.states.shape == (3, 77, 80) and got.pooled.shape == (3, 40)
    assert torch.equal(got.states, states) and torch.equal(got.pooled, pooled)


def test_untrained_encoder_leaves_the_sdxl_unet_bit_identical(tiny_sdxl_base_dir, system):
    vanilla = load_base(str(tiny_sdxl_base_dir), with_image_tower=False).freeze()
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    text = encode_text(vanilla, PROMPTS[:2])
    with torch.no_grad():
        expected = vanilla.unet(latents, t, text.states, added_cond_kwargs=added_cond_kwargs(vanilla, text)).sample
        pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        out = system.predict(pixels, torch.Generator().manual_seed(0))
        assert out.embedding.shape == (2, 80)
        assert all(torch.count_nonzero(B) == 0 for _, B in out.factors.values())
        for hard in (None, text.states):  # single path, and dual path with an identical hard prompt
            got = system.base.unet(latents, t, text.states, added_cond_kwargs=added_cond_kwargs(system.base, text),
                                   cross_attention_kwargs={"adapter": AdapterInputs(
                                       factors=out.factors, hard_states=hard, blend_self=0.3, blend_cross=0.6)}).sample
            assert torch.equal(got, expected)


def test_each_part_of_the_embedding_reaches_its_own_encoder(system):
    """S* is a token of both tokenizers; the first 32 numbers of v move only the first encoder's states."""
    base = system.base
    assert all(system.cfg.model.token in tok.get_vocab() for tok, _ in base.text_encoders)
    v = system.vocab_table[:1].clone()  # [1, 80]
    prompts = ["a photo of <concept>"]
    before = encode_text(base, prompts, system.cfg.model.token, v)
    first, second = v.clone(), v.clone()
    first[:, :32] += 1.0
    second[:, 32:] += 1.0
    a = encode_text(base, prompts, system.cfg.model.token, first)
    b = encode_text(base, prompts, system.cfg.model.token, second)
    assert torch.equal(a.states[..., 32:], before.states[..., 32:]) and torch.equal(a.pooled, before.pooled)
    assert not torch.equal(a.states[..., :32], before.states[..., :32])
    assert torch.equal(b.states[..., :32], before.states[..., :32])
    assert not torch.equal(b.states[..., 32:], before.states[..., 32:]) and not torch.equal(b.pooled, before.pooled)


def test_denoiser_features_equal_the_unets_own_block_outputs(system):
    """The feature path replicates UNet2DConditionModel.forward, text_time embedding included."""
    base, feats = system.base, system.features
    g = torch.Generator().manual_seed(1)
    z_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in [*base.unet.down_blocks, base.unet.mid_block]]
    try:
        neutral = feats.neutral_text(2)
        with torch.no_grad():
            base.unet(z_t, t, neutral.states, added_cond_kwargs=added_cond_kwargs(base, neutral))
    finally:
        for h in hooks:
            h.remove()
    expected = torch.cat([o.mean(dim=(2, 3)) for o in outputs], dim=-1)
    torch.testing.assert_close(feats.denoiser(z_t, t), expected, rtol=0, atol=0)


def test_sdxl_concept_round_trip_stores_one_embedding_per_encoder(system, tmp_path):
    concept = _random_concept(system.base, seed=3)
    concept = Concept(**{**vars(concept), "embedding": torch.randn(80), "token_dims": (32, 48)})
    concept.save(tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / "concept.safetensors"))
    assert tensors["embedding"].shape == (32,) and tensors["embedding_2"].shape == (48,)
    loaded = Concept.load(tmp_path / "c", system.base)
    assert loaded.token_dims == (32, 48) and torch.equal(loaded.embedding, concept.embedding)
    assert all(torch.equal(loaded.factors[k][i], concept.factors[k][i]) for k in concept.factors for i in (0, 1))


STOCK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    base, folder, token, prompt, out = sys.argv[1:]
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    emb = load_file(folder + "/learned_embeds.safetensors")
    pipe.load_textual_inversion(emb["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    # datencoder freezes its base; trainable weights send this tiny SDXL down another CPU kernel path
    # (1.6e-6 apart on the stock pipeline alone, 2026-11-29), so the stock side is frozen too
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    images = pipe(prompt, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(out, images)
    assert not any(name.startswith("datencoder") for name in sys.modules), "datencoder was imported"
""")


@pytest.mark.floor
def test_sdxl_export_matches_stock_diffusers(tiny_sdxl_base_dir, tmp_path):
    """Stock SDXL + the exported LoRA + clip_l/clip_g embedding = ConceptPipeline(dual_path=False)."""
    base = load_base(str(tiny_sdxl_base_dir), with_image_tower=False)
    concept = _random_concept(base, seed=1)
    g = torch.Generator().manual_seed(2)
    concept = Concept(**{**vars(concept), "embedding": 0.05 * torch.randn(80, generator=g), "token_dims": (32, 48)})
    out = export_concept(concept, tmp_path / "export")
    emb = load_file(str(out / EMBEDDING_FILE))
    assert emb["clip_l"].shape == (1, 32) and emb["clip_g"].shape == (1, 48)
    assert torch.equal(torch.cat([emb["clip_l"][0], emb["clip_g"][0]]), concept.embedding)
    assert (out / LORA_FILE).is_file() and "clip_g" in (out / "README.txt").read_text()
    prompt = "a photo of S* on the beach"
    done = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, str(tiny_sdxl_base_dir), str(out), concept.token,
                           prompt.replace("S*", concept.token), str(tmp_path / "stock.npy")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = np.load(tmp_path / "stock.npy")
    ours = ConceptPipeline(base, concept)(prompt, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                                          seed=0, dual_path=False, output_type="np").images
    assert stock.shape == ours.shape == (2, 32, 32, 3)
    # Measured max difference 1.5e-6 (2026-11-29, 2-core CPU, 1 thread): the stock pipeline encodes
    # the prompt once and repeats it, we encode a batch of two; their pooled vectors already differ
    # by 2.4e-7. A wrong layout or scale moves pixels by > 1e-2 (the check below).
    np.testing.assert_allclose(stock, ours, atol=1e-5, rtol=0)
    plain = ConceptPipeline(base)(prompt.replace("S*", "dog"), num_images_per_prompt=2, num_inference_steps=2,
                                  guidance_scale=7.5, seed=0, output_type="np").images
    assert np.abs(ours - plain).max() > 1e-2  # the concept really changes the images


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_cli_pretrain_personalize_generate_export(family, tiny_sd2_base_dir, tiny_sdxl_base_dir, tmp_path):
    base_dir = {"sd2": tiny_sd2_base_dir, "sdxl": tiny_sdxl_base_dir}[family]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert cli.main(["pretrain", str(shipped_configs_dir() / "tiny.yaml"), f"model.pretrained={base_dir}", f"data.root={images}",
                     "train.steps=2", f"train.output_dir={run}"]) == 0
    concept_dir = tmp_path / "concept"
    assert cli.main(["personalize", str(images / "0.png"), "--encoder", str(run / "encoder"),
                     "--out", str(concept_dir), "--steps", "2"]) == 0
    concept = Concept.load(concept_dir)
    assert concept.token_dims == ((32, 48) if family == "sdxl" else (32,))
    assert cli.main(["generate", str(concept_dir), "a photo of S* on the beach", "--num-images", "2",
                     "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("0*.png"))) == 2
    assert cli.main(["export", str(concept_dir), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / EMBEDDING_FILE).is_file() and (tmp_path / "export" / LORA_FILE).is_file()
    assert cli.main(["export", str(concept_dir), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0
    a1111 = load_file(str(tmp_path / "kohya" / "kohya.safetensors"))
    assert set(a1111) == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"})
    parts = [a1111[k][0] for k in (("clip_l", "clip_g") if family == "sdxl" else ("emb_params",))]
    assert torch.equal(torch.cat(parts), concept.embedding)
    assert (tmp_path / "kohya" / "kohya_lora.safetensors").is_file()
