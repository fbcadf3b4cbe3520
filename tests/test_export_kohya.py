"""Export for AUTOMATIC1111 / ComfyUI: the kohya LoRA read back through diffusers' own kohya converter.

The kohya file stores the factors in fp16, so the reference is the diffusers-format export of the
same concept with its factors rounded to fp16: both loaded into a stock pipeline must give the same
UNet output (atol 1e-6) and the same images as datencoder's single-path sampling (atol 1e-5 on
[0, 1] images: the kohya ``alpha`` is fp32, so ``alpha / r`` differs from the concept's scale in the
8th digit; measured max difference 1.5e-6 on the tiny CLIP base, 2026-11-29, 2-core CPU). Against the unrounded concept the difference is the fp16
rounding of the factors only. The A1111 embedding (``emb_params``) is loaded with
``load_textual_inversion``. The SDXL key names (sgm layout) and the ``clip_l``/``clip_g``
embedding are checked on a tiny SDXL-shaped UNet and two CLIP text encoders of different widths.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import _random_concept
from transformers import CLIPTextConfig, CLIPTextModel

from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.errors import DatencoderError
from datencoder.export import export_concept
from datencoder.export_kohya import a1111_embedding_tensors, kohya_lora_tensors
from datencoder.lora import delta_weight
from datencoder.pipeline import ConceptPipeline

PROMPT = "a photo of S* on the beach"


def _fp16_factors(concept: Concept) -> Concept:
    rounded = copy.copy(concept)
    rounded.factors = {k: (A.half().float(), B.half().float()) for k, (A, B) in concept.factors.items()}
    return rounded


def _stock(base_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_pretrained(str(base_dir), subfolder="scheduler")  # datencoder's sampler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_out(pipe, token: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 8, 8, generator=gen)  # [B, C, h, w]
    ids = pipe.tokenizer([f"a photo of {token}", "a dog"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]  # [B, L, D]
        return pipe.unet(latent, torch.tensor([500, 20]), states).sample


@pytest.fixture(scope="module")
def kohya(tiny_clip_base_dir, tmp_path_factory):
    base = load_base(str(tiny_clip_base_dir), with_image_tower=False)
    concept = _random_concept(base, seed=4, rank=2, scale=0.7)
    root = tmp_path_factory.mktemp("kohya")
    out = export_concept(concept, root / "my concept", format="kohya")
    reference = export_concept(_fp16_factors(concept), root / "diffusers")
    return base, concept, out, reference


def test_kohya_files_layout(kohya):
    _, concept, out, _ = kohya
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "my_concept.safetensors", "my_concept_lora.safetensors"]
    with safe_open(str(out / "my_concept_lora.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        A, B = concept.factors[name]
        assert f.get_tensor(f"{key}.lora_down.weight").dtype == torch.float16
        assert torch.equal(f.get_tensor(f"{key}.lora_down.weight"), A.half())
        assert torch.equal(f.get_tensor(f"{key}.lora_up.weight"), B.half())
        assert f.get_tensor(f"{key}.alpha").item() == pytest.approx(2 * 0.7)
        assert f.metadata()["ss_network_dim"] == "2"
    assert len(keys) == 3 * len(concept.factors)
    assert all(k.startswith("lora_unet_") for k in keys)
    emb = load_file(str(out / "my_concept.safetensors"))
    assert list(emb) == ["emb_params"] and torch.equal(emb["emb_params"], concept.embedding[None])
    readme = (out / "README.txt").read_text()
    assert "<lora:my_concept_lora:1>" in readme and "Single path" in readme


def test_kohya_matches_diffusers_export(kohya, tiny_clip_base_dir):
    base, concept, out, reference = kohya
    ours, theirs, plain = _stock(tiny_clip_base_dir), _stock(tiny_clip_base_dir), _stock(tiny_clip_base_dir)
    # diffusers detects the kohya layout (all keys lora_unet_*) and converts it itself
    ours.load_lora_weights(str(out), weight_name="my_concept_lora.safetensors")
    ours.load_textual_inversion(str(out / "my_concept.safetensors"), token="my_concept")
    theirs.load_lora_weights(str(reference), weight_name="pytorch_lora_weights.safetensors")
    theirs.load_textual_inversion(str(reference), token="my_concept")
    table = ours.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ours.tokenizer.convert_tokens_to_ids("my_concept")], concept.embedding)
    a, b = _unet_out(ours, "my_concept"), _unet_out(theirs, "my_concept")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - _unet_out(plain, "my_concept")).abs().max() > 1e-2  # the LoRA is really applied
    # the same images as datencoder's single-path sampling of the fp16-rounded concept
    images = ours("a photo of my_concept on the beach", num_images_per_prompt=2, num_inference_steps=2,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np").images
    rounded = ConceptPipeline(base, _fp16_factors(concept))(PROMPT, num_images_per_prompt=2, num_inference_steps=2,
                                                             guidance_scale=7.5, seed=0, dual_path=False,
                                                             output_type="np").images
    np.testing.assert_allclose(images, rounded, atol=1e-5, rtol=0)


def test_kohya_refuses_non_clip_text_encoder(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir), with_image_tower=False)
    with pytest.raises(DatencoderError, match="needs a CLIP text encoder.*'bert'"):
        export_concept(_random_concept(base, seed=5), tmp_path / "x", format="kohya")
    assert not (tmp_path / "x").exists()


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    # SDXL's block structure at small widths: a plain first down block, cross-attention in the two
    # deeper ones with several transformer layers, layers_per_block 2, and the "text_time" added
    # embedding (pooled text [16] + 6 size/crop ids of width 4).
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), norm_num_groups=4,
        cross_attention_dim=48, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
    )


def test_kohya_sdxl_names_round_trip_through_diffusers():
    unet = _tiny_sdxl_unet().eval()
    gen = torch.Generator().manual_seed(6)
    factors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "attn1.to_v")):
            factors[name] = (torch.randn(2, module.in_features, generator=gen),
                             torch.randn(module.out_features, 2, generator=gen))
    assert any(n.startswith("mid_block") for n in factors) and any(n.startswith("up_blocks.1") for n in factors)
    state = kohya_lora_tensors(factors, 0.5, unet.config, dtype=torch.float32)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state  # down 1, layer 0
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha" in state
    # diffusers' own path: sgm block remapping with the UNet config, then the kohya converter
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
    loaded = copy.deepcopy(unet)
    StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, loaded)
    merged = copy.deepcopy(unet)  # the reference: W + 0.5 * B @ A written into the weights
    for name, (A, B) in factors.items():
        merged.get_submodule(name).weight.data += delta_weight(A, B, 0.5)
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 5, 48, generator=gen)
    added = {"text_embeds": torch.randn(1, 16, generator=gen), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        outs = [m(latent, 10, states, added_cond_kwargs=added).sample for m in (loaded, merged, unet)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert (outs[0] - outs[2]).abs().max() > 1e-2


def test_a1111_sdxl_embedding_loads_into_both_encoders(tiny_clip_base_dir):
    pipe = _stock(tiny_clip_base_dir)
    config = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    second = CLIPTextModel(config)
    gen = torch.Generator().manual_seed(7)
    v_l, v_g = torch.randn(32, generator=gen), torch.randn(48, generator=gen)
    state = a1111_embedding_tensors(v_l, v_g)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    # diffusers' documented SDXL recipe: one load per encoder (tokenizer copies stand in for SDXL's two)
    tokenizer_2 = copy.deepcopy(pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="sks", text_encoder=second, tokenizer=tokenizer_2)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks")], v_l)
    assert torch.equal(second.get_input_embeddings().weight[tokenizer_2.convert_tokens_to_ids("sks")], v_g)
