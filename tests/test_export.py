"""Export to stock diffusers: a fresh process that never imports datencoder reproduces the concept.

The exported LoRA + textual-inversion embedding, loaded with ``load_lora_weights`` and
``load_textual_inversion`` into a stock ``StableDiffusionPipeline``, must give the same images as
``ConceptPipeline(..., dual_path=False)`` on the same seed (export is single path, a = 1).
Tolerance: atol 1e-6 on images in [0, 1]; both sides run the same fp32 ops, and the measured
difference was exactly 0 for both tiny bases (2026-11-27, 2-core CPU).

Both text-encoder families are covered: ``load_textual_inversion`` places no restriction on
the tokenizer class, so BERT (WordPiece) works as well as CLIP (BPE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from datencoder.attention import attention_layers
from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.errors import DatencoderError
from datencoder.export import EMBEDDING_FILE, LORA_FILE, export_concept
from datencoder.lora import factor_shapes
from datencoder.pipeline import ConceptPipeline

PROMPT = "a photo of S* on the beach"
STOCK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # argv: TOKEN PROMPT then (BASE_DIR EXPORT_DIR OUT.npy) triples
    token, prompt, *jobs = sys.argv[1:]
    for base, folder, out in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
        pipe.load_textual_inversion(folder, token=token)
        images = pipe(prompt, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        np.save(out, images)
    assert not any(name.startswith("datencoder") for name in sys.modules), "datencoder was imported"
""")


def _random_concept(base, seed: int, rank: int = 2, scale: float = 0.7) -> Concept:
    """A concept with non-zero factors on every attention projection and a random embedding."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name in attention_layers(base.unet):
        module = base.unet.get_submodule(name)
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            linear = module.to_out[0] if target == "to_out.0" else getattr(module, target)
            (r, fan_in), (fan_out, _) = factor_shapes(linear, rank)
            factors[f"{name}.{target}"] = (0.5 * torch.randn(r, fan_in, generator=gen),
                                           0.5 * torch.randn(fan_out, r, generator=gen))
    table = base.text_encoder.get_input_embeddings().weight
    embedding = torch.randn(table.shape[1], generator=gen) * table.norm(dim=1).mean() / table.shape[1] ** 0.5
    return Concept(embedding=embedding, factors=factors, hard_word="dog", scale=scale,
                   base={"name": base.name, "fingerprint": base.fingerprint})


FAMILIES = ("bert", "clip", "sd2")  # SD 1.x with either text family, SD 2.x (v-prediction); SDXL: test_sdxl.py


@pytest.fixture(scope="module")
def exported(tiny_base_dir, tiny_clip_base_dir, tiny_sd2_base_dir, tmp_path_factory):
    """Per family: (base, concept, export folder, stock images); one subprocess for all of them."""
    root = tmp_path_factory.mktemp("export")
    runs, argv = {}, []
    for family, base_dir in zip(FAMILIES, (tiny_base_dir, tiny_clip_base_dir, tiny_sd2_base_dir)):
        base = load_base(str(base_dir), with_image_tower=False)
        concept = _random_concept(base, seed=1)
        out = export_concept(concept, root / family)
        runs[family] = (base, concept, out, root / f"{family}.npy")
        argv += [str(base_dir), str(out), str(root / f"{family}.npy")]
    token = runs["bert"][1].token
    done = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, token, PROMPT.replace("S*", token), *argv],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {family: (base, concept, out, np.load(npy)) for family, (base, concept, out, npy) in runs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_files_in_diffusers_layout(exported, family):
    _, concept, out, _ = exported[family]
    # PEFT key names under "unet.", adapter metadata with alpha = rank * scale, {token: [D]}.
    with safe_open(str(out / LORA_FILE), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    some = next(iter(concept.factors))
    assert f"unet.{some}.lora_A.weight" in keys and f"unet.{some}.lora_B.weight" in keys
    assert len(keys) == 2 * len(concept.factors)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 2 and adapter["unet.lora_alpha"] == pytest.approx(2 * 0.7)
    assert set(adapter["unet.target_modules"]) == set(concept.factors)
    with safe_open(str(out / EMBEDDING_FILE), framework="pt") as f:
        assert list(f.keys()) == [concept.token]
        assert torch.equal(f.get_tensor(concept.token), concept.embedding)
    readme = (out / "README.txt").read_text()
    assert "load_textual_inversion" in readme and "Single path" in readme


@pytest.mark.floor
@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_stock_diffusers(exported, family):
    base, concept, _, stock = exported[family]
    ours = ConceptPipeline(base, concept)(PROMPT, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                                          seed=0, dual_path=False, output_type="np").images
    assert stock.shape == ours.shape == (2, base.resolution, base.resolution, 3)
    np.testing.assert_allclose(stock, ours, atol=1e-6, rtol=0)
    # the concept really changes the images: the same seed without it is far away
    plain = ConceptPipeline(base)(PROMPT.replace("S*", "dog"), num_images_per_prompt=2, num_inference_steps=2,
                                  guidance_scale=7.5, seed=0, output_type="np").images
    assert np.abs(ours - plain).max() > 1e-2


def test_export_rejects_unknown_format(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir), with_image_tower=False)
    with pytest.raises(DatencoderError, match="unknown export format 'onnx'"):
        export_concept(_random_concept(base, seed=2), tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()
