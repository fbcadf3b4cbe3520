"""Devices and precision (issue 9, part 2): half-precision bases, gradient checkpointing,
weight variants, generation options. Everything runs on the CPU; benchmarks/cuda_smoke.py runs
the same path on a GPU.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from datencoder.base import load_base, resolve_device, resolve_dtype
from datencoder.config import Config
from datencoder.errors import DatencoderError
from datencoder.features import FeatureExtractor
from datencoder.pipeline import ConceptPipeline
from datencoder.prepare import prepare_base
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize


def _cfg(base_dir, **tune) -> Config:
    cfg = Config()
    cfg.model.pretrained = str(base_dir)
    cfg.encoder.tower_layers = [-1, -2]  # the tiny image tower has 2 layers
    cfg.encoder.hidden_dim = 32
    cfg.loss.num_negatives = 8
    cfg.tune.steps, cfg.tune.batch_size = 2, 1
    for key, value in tune.items():
        setattr(cfg.tune, key, value)
    return cfg


def _system(base, cfg, seed=0) -> EncoderSystem:
    """An encoder with non-zero offsets (the hypernetwork's zero-initialised core perturbed)."""
    prepare_base(base, cfg.model.token)  # adding the placeholder draws from the global RNG once
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        system = EncoderSystem(base, cfg)
        with torch.no_grad():
            for p in system.encoder.hypernetwork.parameters():
                p.add_(0.05 * torch.randn(p.shape))
    return system


PIXELS = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_bf16_base_personalises_and_generates_finite_with_fp32_trainables(tiny_clip_base_dir):
    base = load_base(str(tiny_clip_base_dir), torch_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for m in base.modules() for p in m.parameters())
    system = _system(base, _cfg(tiny_clip_base_dir))
    assert all(p.dtype == torch.float32 for p in system.encoder.parameters())
    concept = personalize(system, PIXELS)
    tensors = [concept.embedding, *(t for pair in concept.factors.values() for t in pair)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)
    images = ConceptPipeline(base, concept)("a photo of S*", num_images_per_prompt=2, num_inference_steps=2,
                                            guidance_scale=2.0, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images.float()).all()


@pytest.mark.floor
def test_gradient_checkpointing_gives_the_same_gradients(tiny_clip_base_dir):
    base = load_base(str(tiny_clip_base_dir))
    system = _system(base, _cfg(tiny_clip_base_dir))
    gen = torch.Generator().manual_seed(0)
    out = system.predict(PIXELS.unsqueeze(0), gen)
    latents = system.encode_latents(PIXELS.expand(2, -1, -1, -1), gen)
    batch = system.objective.add_noise(latents, gen)
    attn = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    calls = []
    attn.register_forward_hook(lambda *args: calls.append(1))

    def grads():
        v = out.embedding.detach().clone().requires_grad_()
        factors = {k: (A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_())
                   for k, (A, B) in out.factors.items()}
        terms = system.objective(batch, ["a photo of S*", "S* on the beach"], v, factors, True, torch.Generator().manual_seed(1))
        sum(terms.values()).backward()
        return [v.grad, *(t.grad for pair in factors.values() for t in pair)]

    plain, n_plain = grads(), len(calls)
    base.unet.enable_gradient_checkpointing()
    try:
        checkpointed = grads()
    finally:
        base.unet.disable_gradient_checkpointing()
    assert len(calls) - n_plain == 2 * n_plain  # the dual-path processors really ran again in backward
    assert all(g is not None and g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.floor
def test_tuning_with_gradient_checkpointing_matches_and_restores(tiny_clip_base_dir):
    base = load_base(str(tiny_clip_base_dir))
    calls = []
    block = base.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))  # recomputing may stop early
    plain = personalize(_system(base, _cfg(tiny_clip_base_dir)), PIXELS)
    n_plain = len(calls)
    ckpt = personalize(_system(base, _cfg(tiny_clip_base_dir, gradient_checkpointing=True)), PIXELS)
    # the frozen (eval-mode) UNet really checkpoints: each training forward of the block runs again in backward
    assert len(calls) - n_plain == n_plain + sum(calls[:n_plain])
    assert not base.unet.is_gradient_checkpointing
    torch.testing.assert_close(plain.embedding, ckpt.embedding, rtol=1e-5, atol=1e-6)
    for key, (A, B) in plain.factors.items():
        torch.testing.assert_close(A, ckpt.factors[key][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, ckpt.factors[key][1], rtol=1e-5, atol=1e-6)


def test_image_tower_dry_run_follows_the_tower_device(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    width = FeatureExtractor(base, _cfg(tiny_base_dir).encoder).image_width
    base.image_tower.to("meta")  # weights elsewhere than the CPU: a CPU-built input would fail
    assert FeatureExtractor(base, _cfg(tiny_base_dir).encoder).image_width == width


def _fp16_only_copy(src, dst):
    """The tiny base with every component saved as ``*.fp16.safetensors`` only (a common download)."""
    shutil.copytree(src, dst)
    base = load_base(str(src))
    parts = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoder, "image_tower": base.image_tower}
    for name, module in parts.items():
        for f in (dst / name).glob("*.safetensors"):
            f.unlink()
        module.to(torch.float16).save_pretrained(dst / name, variant="fp16")
    assert sorted(p.name for p in (dst / "unet").glob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]
    return base


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_folder_with_only_fp16_variant_loads(tiny_base_dir, tmp_path, variant):
    reference = load_base(str(tiny_base_dir))
    _fp16_only_copy(tiny_base_dir, tmp_path / "fp16")
    base = load_base(str(tmp_path / "fp16"), variant=variant)
    assert base.fingerprint == reference.fingerprint  # the fingerprint reads weights through fp16
    for ours, theirs in zip(base.modules(), reference.modules()):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert p.dtype == torch.float32, name  # loaded in the requested dtype (fp32)
            if not name.startswith("pooler."):  # the tiny BERT has no pooler: random on every load
                torch.testing.assert_close(p, q.half().float(), rtol=0, atol=0)
    assert torch.isfinite(FeatureExtractor(base, _cfg(tiny_base_dir).encoder).image(PIXELS[None])).all()


def test_generation_size_scale_and_negative_prompt(tiny_base_dir):
    base = load_base(str(tiny_base_dir), with_image_tower=False)
    from test_export import _random_concept  # a concept with non-zero factors on every projection

    concept = _random_concept(base, seed=3)
    pipe = ConceptPipeline(base, concept)
    kwargs = dict(num_images_per_prompt=1, num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    wide = pipe("a photo of S*", height=16, width=40, **kwargs).images
    assert wide.shape == (1, 3, 16, 40)
    with pytest.raises(DatencoderError, match="multiples of 8"):
        pipe("a photo of S*", height=30, **kwargs)
    default = pipe("a photo of S*", **kwargs).images
    # lora_scale multiplies the concept's scale: 0 removes the offsets, leaving the embedding
    zero = pipe("a photo of S*", lora_scale=0.0, **kwargs).images
    concept.scale = 0.0
    assert torch.equal(zero, ConceptPipeline(base, concept)("a photo of S*", **kwargs).images)
    assert not torch.equal(zero, default)
    assert not torch.equal(default, pipe("a photo of S*", negative_prompt="red", **kwargs).images)


def test_device_and_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(DatencoderError, match="unknown dtype"):
        resolve_dtype("fp8")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DatencoderError, match="CUDA is not available"):
            resolve_device("cuda")


def test_generate_cli_size_precision_and_errors(tiny_base_dir, tmp_path, capsys):
    import json

    from PIL import Image

    from datencoder.recipes.cli import main

    common = ["generate", "a photo of a dog", "--base", str(tiny_base_dir), "--steps", "2", "--num-images", "1"]
    assert main([*common, "--height", "30", "--out", str(tmp_path / "bad")]) == 2
    assert "multiples of 8" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "ok"
    assert main([*common, "--height", "16", "--width", "40", "--dtype", "bf16", "--device", "cpu",
                 "--negative-prompt", "blurry", "--out", str(out)]) == 0
    assert Image.open(out / "000.png").size == (40, 16)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["dtype"] == "bf16" and settings["negative_prompt"] == "blurry"
