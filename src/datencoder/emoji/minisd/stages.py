"""The stages of the embedded default minisd-emoji, each ``run_X(cfg, resume) -> 0``.

``vae`` (AutoencoderKL on 64x64 emoji), ``cache`` (frozen MiniLM text states and VAE latents),
``unet`` (UNet2DConditionModel on the cached latents), ``export`` (fp16 diffusers folders into
assets/minisd-emoji). The training stages run on the one loop of ``datencoder.training`` (bf16
autocast, EMA, time budget, resumable checkpoints); ``recipes/minisd.py`` is their command line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ...config import from_dict, to_dict
from ...errors import DatencoderError
from ...io import save_file_atomic, write_json_atomic
from ...training import find_checkpoint, fit, load_ema_weights, read_checkpoint
from ...training.loop import LoopResult
from .config import MiniTrainConfig, UNetStageConfig, VAEStageConfig
from .data import build_caption_table, caption_parts, encode_text, load_images, load_text_encoder, read_manifest
from .export import default_export_dir, export_minisd
from .losses import diffusion_loss, vae_loss
from .models import MiniVAEConfig, build_scheduler, build_unet, build_vae, seeded_init
from .sampling import make_pipeline, sample_images, save_grid

__all__ = ["run_vae", "run_cache", "run_unet", "run_export", "train_stage"]

logger = logging.getLogger(__name__)


def _example_indices(indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A stage's batch is the example indices; its loss function indexes its tensors with them."""
    return indices


def train_stage(model: torch.nn.Module, loss_fn: Callable, num_examples: int, cfg: MiniTrainConfig, resume: bool,
                sample_fn: Callable | None = None, meta: dict | None = None) -> LoopResult:
    """One stage's training on ``cfg.threads`` CPU threads."""
    torch.set_num_threads(cfg.threads)
    return fit(model, loss_fn, _example_indices, num_examples, cfg.loop(), resume=resume, sample_fn=sample_fn,
               meta=meta)


def _shipped(path: str, part: str = "") -> str:
    """``minisd-emoji`` names the shipped model's folder (or its ``part``); other paths are kept."""
    from ...io import ASSETS

    return str(ASSETS / "minisd-emoji" / part) if path == "minisd-emoji" else path


def _vae_from_dir(vae_dir: str, scaling_factor: float = 1.0):
    """The VAE stage's architecture (from its checkpoint JSON) with its EMA weights, or an
    exported diffusers ``vae/`` folder (e.g. the shipped model's, ``minisd-emoji``, to train a UNet on it)."""
    vae_dir = _shipped(vae_dir, "vae")
    trained = find_checkpoint(vae_dir) is not None
    exported = Path(vae_dir) / "config.json"
    if not trained and exported.exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
        vae.register_to_config(scaling_factor=scaling_factor)
        config = vae.config
        arch = MiniVAEConfig(resolution=config.sample_size, block_out_channels=list(config.block_out_channels),
                             layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                             norm_num_groups=config.norm_num_groups)
        return arch, vae.eval().requires_grad_(False)
    if not trained:
        raise DatencoderError(f"no VAE checkpoint in {vae_dir}; run 'datencoder minisd vae' first")
    ckpt = read_checkpoint(vae_dir)
    arch = MiniVAEConfig(**ckpt.meta["config"]["model"])
    vae = build_vae(arch, scaling_factor)
    vae.load_state_dict(ckpt.averaged())
    return arch, vae.eval().requires_grad_(False)


def _exported_scaling(vae_dir: str) -> float | None:
    """The scaling factor an exported ``vae/`` folder records (what its UNet was trained with)."""
    vae_dir = _shipped(vae_dir, "vae")
    config = Path(vae_dir) / "config.json"
    if find_checkpoint(vae_dir) is not None or not config.exists():
        return None
    return json.loads(config.read_text()).get("scaling_factor")


def _unet_weights(init_from: str) -> dict[str, torch.Tensor]:
    """EMA weights of a UNet run folder, or the fp32 weights of an exported model: a diffusers
    ``unet/`` folder, a folder holding one (e.g. an exported minisd-emoji), or ``minisd-emoji``."""
    path = Path(_shipped(init_from))
    for folder in (path / "unet", path):
        if find_checkpoint(folder) is None and (folder / "config.json").exists():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
            return {k: v.float() for k, v in unet.state_dict().items()}
    return load_ema_weights(path)


def run_vae(cfg: VAEStageConfig, resume: bool) -> int:
    rows = read_manifest(cfg.data)
    images = load_images(rows, cfg.data.root, cfg.model.resolution)
    logger.info("VAE: %d training images", len(images))
    with seeded_init(cfg.train.seed):
        vae = build_vae(cfg.model)
    if cfg.init_from and not resume:
        try:
            vae.load_state_dict(load_ema_weights(Path(cfg.init_from)))
        except RuntimeError as e:
            raise DatencoderError(f"init_from={cfg.init_from}: its VAE has another architecture "
                                  f"({str(e).splitlines()[0]})") from None
        logger.info("VAE initialised from the EMA weights in %s", cfg.init_from)
    if cfg.decoder_only:
        # The latent space is the encoder's: frozen, a UNet trained on it (and its cached
        # latents) stay valid while the reconstructions improve.
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        logger.info("decoder only: %d of %d VAE parameters trained", sum(p.numel() for p in vae.parameters() if p.requires_grad),
                    sum(p.numel() for p in vae.parameters()))
    show = images[torch.linspace(0, len(images) - 1, 8).long()]

    def loss_fn(model, idx, gen):
        return vae_loss(model, images[idx], gen, cfg.loss)

    @torch.no_grad()
    def sample_fn(ema_vae, step):
        recon = ema_vae(show, sample_posterior=False).sample
        save_grid([show, recon], Path(cfg.train.work_dir) / "samples" / f"step{step:06d}.png")

    train_stage(vae, loss_fn, len(images), cfg.train, resume, sample_fn, {"config": to_dict(cfg)})
    return 0


def run_cache(cfg: UNetStageConfig, resume: bool) -> int:
    """Text states and latents for every training row (skips parts that already exist)."""
    rows = read_manifest(cfg.data)
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    files = [r["file"] for r in rows]
    text_path, latent_path = cache / "text.safetensors", cache / "latents.safetensors"
    if "text" in cfg.cache_parts and not text_path.exists():
        captions, table = build_caption_table(rows, cfg.data)
        logger.info("encoding %d unique captions for %d rows", len(captions), len(rows))
        tokenizer, encoder = load_text_encoder(cfg.data.max_length)
        torch.set_num_threads(cfg.train.threads)
        states = encode_text(captions, tokenizer, encoder, cfg.data.max_length, bf16=cfg.train.bf16)
        save_file_atomic(text_path, {"states": states.half(), "table": table},
                         {"max_length": str(cfg.data.max_length), "bf16": str(cfg.train.bf16), "captions": json.dumps(captions)})
    if "latents" in cfg.cache_parts and not latent_path.exists():
        arch, vae = _vae_from_dir(cfg.vae_dir)
        torch.set_num_threads(cfg.train.threads)
        images = load_images(rows, cfg.data.root, arch.resolution)
        with torch.no_grad():
            latents = torch.cat([vae.encode(images[i : i + 128]).latent_dist.mean for i in range(0, len(images), 128)])
        # an exported VAE keeps the factor its UNet was trained with; a new one is scaled to unit std
        scaling = _exported_scaling(cfg.vae_dir) or 1.0 / latents.std().item()
        logger.info("cached %s latents, std %.3f, scaling factor %.4f", tuple(latents.shape), latents.std().item(), scaling)
        save_file_atomic(latent_path, {"latents": latents}, {"scaling_factor": repr(scaling)})
    write_json_atomic(cache / "rows.json", files)
    return 0


def _load_cache(cfg: UNetStageConfig, num_rows: int):
    cache = Path(cfg.cache_dir)
    if not (cache / "latents.safetensors").exists():
        raise DatencoderError(f"no cache in {cache}; run 'datencoder minisd cache' first")
    with safe_open(str(cache / "latents.safetensors"), "pt") as f:
        scaling = float(f.metadata()["scaling_factor"])
    with safe_open(str(cache / "text.safetensors"), "pt") as f:
        if int(f.metadata()["max_length"]) != cfg.data.max_length:
            raise DatencoderError("cached text states use another data.max_length; delete the cache and rerun 'cache'")
    latents = load_file(str(cache / "latents.safetensors"))["latents"] * scaling
    text = load_file(str(cache / "text.safetensors"))
    if len(latents) != num_rows:
        raise DatencoderError(f"cache holds {len(latents)} rows, manifest {num_rows}; delete {cache} and rerun 'cache'")
    return latents, text["states"], text["table"], scaling


def _grid_prompts(rows: list[dict], cfg: UNetStageConfig, resolution: int) -> tuple[list[str], torch.Tensor]:
    """Full captions of ``grid.num_prompts`` rows spread over the manifest, and their images."""
    show = [rows[int(i)] for i in torch.linspace(0, len(rows) - 1, cfg.grid.num_prompts).long()]
    return [", ".join(caption_parts(r)) for r in show], load_images(show, cfg.data.root, resolution)


def run_unet(cfg: UNetStageConfig, resume: bool) -> int:
    rows = read_manifest(cfg.data)
    latents, states, table, scaling = _load_cache(cfg, len(rows))
    arch, vae = _vae_from_dir(cfg.vae_dir, scaling)
    tokenizer, encoder = load_text_encoder(cfg.data.max_length)
    with seeded_init(cfg.train.seed):
        unet = build_unet(cfg.model, arch, encoder.config.hidden_size)
    if cfg.init_from and not resume:
        try:
            unet.load_state_dict(_unet_weights(cfg.init_from))
        except RuntimeError as e:
            raise DatencoderError(f"init_from={cfg.init_from}: its UNet has another architecture ({str(e).splitlines()[0]})") from None
        logger.info("UNet initialised from the EMA weights in %s", cfg.init_from)
    scheduler = build_scheduler(cfg.diffusion.num_train_timesteps, cfg.diffusion.prediction_type,
                                cfg.diffusion.zero_terminal_snr)
    logger.info("UNet: %.2fM parameters, %d examples", sum(p.numel() for p in unet.parameters()) / 1e6, len(rows))
    k = table.shape[1]
    prompts, real = _grid_prompts(rows, cfg, arch.resolution)

    def loss_fn(model, idx, gen):
        b = len(idx)
        variant = torch.randint(0, k, (b,), generator=gen)
        cap = table[idx, variant]
        cap = torch.where(torch.rand(b, generator=gen) < cfg.data.empty_caption_prob, torch.zeros_like(cap), cap)
        return diffusion_loss(model, latents[idx], states[cap].float(), scheduler, gen, cfg.diffusion)

    def sample_fn(ema_unet, step):
        pipe = make_pipeline(vae, ema_unet, scheduler, tokenizer, encoder)
        rows_out = [real] + [sample_images(pipe, prompts, cfg.grid.steps, cfg.grid.guidance, cfg.grid.seed + s)
                             for s in range(cfg.grid.seeds)]
        save_grid(rows_out, Path(cfg.train.work_dir) / "samples" / f"step{step:06d}.png")

    train_stage(unet, loss_fn, len(rows), cfg.train, resume, sample_fn if cfg.grid.num_prompts else None,
                {"config": to_dict(cfg), "scaling_factor": scaling, "prompts": prompts})
    return 0


def run_export(cfg: UNetStageConfig, resume: bool) -> int:
    if find_checkpoint(cfg.train.work_dir) is None:
        raise DatencoderError(f"no UNet checkpoint in {cfg.train.work_dir}; run 'datencoder minisd unet' first")
    ckpt = read_checkpoint(cfg.train.work_dir)
    saved = ckpt.meta
    # The architecture the UNet was trained with (stored in its checkpoint), not the current YAML.
    trained = from_dict(UNetStageConfig, saved["config"])
    arch, vae = _vae_from_dir(trained.vae_dir, saved["scaling_factor"])
    _, encoder = load_text_encoder(trained.data.max_length)
    unet = build_unet(trained.model, arch, encoder.config.hidden_size)
    unet.load_state_dict(ckpt.averaged())
    scheduler = build_scheduler(trained.diffusion.num_train_timesteps, trained.diffusion.prediction_type,
                                trained.diffusion.zero_terminal_snr)
    out = Path(cfg.export_dir) if cfg.export_dir else default_export_dir()
    export_minisd(vae, unet, scheduler, trained.data.max_length, out)
    logger.info("exported UNet step %d to %s", saved["step"], out)
    if cfg.grid.num_prompts:
        _grid_from_export(out, trained, Path(cfg.train.work_dir) / "samples" / "exported.png")
    return 0


def _grid_from_export(out: Path, cfg: UNetStageConfig, path: Path) -> None:
    """Reload the fp16 export with stock diffusers (computing in fp32) and sample the grid prompts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    tokenizer, encoder = load_text_encoder(cfg.data.max_length)
    pipe = make_pipeline(vae, unet, scheduler, tokenizer, encoder)
    prompts, real = _grid_prompts(read_manifest(cfg.data), cfg, vae.config.sample_size)
    samples = [sample_images(pipe, prompts, cfg.grid.steps, cfg.grid.guidance, cfg.grid.seed + s) for s in range(cfg.grid.seeds)]
    save_grid([real] + samples, path)
    logger.info("sample grid of the exported model: %s", path)
