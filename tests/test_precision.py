"""Half precision: fp32 VAE encoding where the VAE asks for it, fp32 trained tensors, no fp16
tuning without loss scaling, and a bf16 personalisation within a stated distance of the fp32 one."""

from __future__ import annotations

import copy

import pytest
import torch

from datencoder.base import load_base
from datencoder.config import TrainConfig, TuneConfig
from datencoder.errors import DatencoderError
from datencoder.eval.baselines import (DreamBoothConfig, DreamBoothLoRAConfig, OptimisationRun, TextualInversionConfig,
                                       dreambooth_lora, dreambooth_unet, textual_inversion)
from datencoder.pipeline import ConceptPipeline
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize

from test_devices import PIXELS, _cfg, _system


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp16_vae_with_force_upcast_encodes_in_fp32(tiny_clip_base_dir):
    reference = load_base(str(tiny_clip_base_dir), with_image_tower=False)
    with torch.no_grad():  # activations past fp16's 65504: the overflow SDXL 1.0's VAE has in fp16
        weight = reference.vae.encoder.conv_in.weight
        weight.mul_(3e4 / weight.abs().max())
    half = copy.deepcopy(reference).to(dtype=torch.float16)
    reference.vae.to(torch.float16).to(torch.float32)  # the same (rounded) weights, in fp32
    assert half.vae.config.force_upcast
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = reference.encode_latents(pixels, torch.Generator().manual_seed(0))
    got = half.encode_latents(pixels, torch.Generator().manual_seed(0))
    assert torch.isfinite(expected).all() and torch.equal(got, expected)
    assert half.vae.dtype == torch.float16  # cast back
    half.vae.register_to_config(force_upcast=False)  # a VAE that does not ask for it runs in fp16
    assert not torch.isfinite(half.encode_latents(pixels, torch.Generator().manual_seed(0))).all()


def test_fp16_tuning_is_refused_in_one_line_recommending_bf16(tiny_base_dir):
    base = load_base(str(tiny_base_dir), torch_dtype="fp16")
    system = EncoderSystem(base, _cfg(tiny_base_dir))
    with pytest.raises(DatencoderError, match=r"float16 base .*\(--dtype bf16\)"):
        personalize(system, PIXELS)
    with pytest.raises(DatencoderError, match="float16 base"):
        textual_inversion(base, PIXELS, TextualInversionConfig(steps=1, batch_size=1))
    with pytest.raises(DatencoderError, match="train.mixed_precision=fp16"):
        TrainConfig(base_dtype="fp16")
    assert TrainConfig(base_dtype="fp16", mixed_precision="fp16").base_dtype == "fp16"


def test_every_baseline_steps_fp32_tensors_on_a_bf16_base(tiny_clip_base_dir):
    base = load_base(str(tiny_clip_base_dir), torch_dtype="bf16")
    runs = {name: OptimisationRun() for name in ("ti", "lora", "unet")}
    textual_inversion(base, PIXELS, TextualInversionConfig(steps=1, batch_size=1), run=runs["ti"])
    dreambooth_lora(base, PIXELS, DreamBoothLoRAConfig(steps=1, batch_size=1, rank=2, rare_word="ghost"), run=runs["lora"])
    _, tuned = dreambooth_unet(base, PIXELS, DreamBoothConfig(steps=2, batch_size=1, lr=1e-3, rare_word="ghost"), run=runs["unet"])
    for name, run in runs.items():
        stepped = [p for g in run.state["optimizer"].param_groups for p in g["params"]]
        assert stepped and all(p.dtype == torch.float32 for p in stepped), name
    # the bf16 UNet that computes is its fp32 masters rounded; the masters moved
    optimizer = runs["unet"].state["optimizer"]
    assert all(torch.equal(p, m.to(p.dtype)) for p, m in zip(optimizer.params, optimizer.masters))
    assert tuned.unet.dtype == torch.bfloat16 and any(not torch.equal(m, p.float())
                                                      for p, m in zip(base.unet.parameters(), optimizer.masters))


def test_bf16_personalisation_stays_within_bounds_of_fp32(tiny_clip_base_dir):
    """Same seed, same encoder, base in fp32 and in bf16. Measured on this tiny base (4 steps, lr
    1e-4, shared-basis heads): the tuning's movement of v differs by 0.7 % and of the largest B by
    1.2 %; held in bf16 instead of fp32 the tuned tensors moved 6.6 % and 76 % off."""
    results = {}
    for dtype in ("fp32", "bf16"):
        base = load_base(str(tiny_clip_base_dir), torch_dtype=dtype)
        system = _system(base, _cfg(tiny_clip_base_dir, steps=4, batch_size=2, lr_embedding=1e-4, lr_lora=1e-4))
        predicted = personalize(system, PIXELS, TuneConfig(steps=0))
        tuned = personalize(system, PIXELS)
        latents = ConceptPipeline(base, tuned)("a photo of S*", num_images_per_prompt=1, num_inference_steps=3,
                                               guidance_scale=2.0, seed=0, output_type="latent").images
        results[dtype] = predicted, tuned, latents
    (p16, t16, l16), (p32, t32, l32) = results["bf16"], results["fp32"]
    assert _rel(p16.embedding, p32.embedding) < 5e-3  # the prediction
    assert _rel(t16.embedding, t32.embedding) < 5e-3  # the tuned embedding
    assert _rel(t16.embedding - p16.embedding, t32.embedding - p32.embedding) < 3e-2  # the tuning's step
    key = max(t32.factors, key=lambda k: float((t32.factors[k][1] - p32.factors[k][1]).norm()))
    # the largest B's step: 9.6 % apart with the factorized heads (the default), 1.2 % with the shared
    # basis; held in bf16 the tuned tensors moved 76 % off (shared basis)
    assert _rel(t16.factors[key][1] - p16.factors[key][1], t32.factors[key][1] - p32.factors[key][1]) < 0.15
    assert _rel(l16, l32) < 3e-2  # a generated latent
