"""Cost at real size: seconds and peak memory of each stage on a random SD 1.5-architecture model.

Builds (once, into OUT/model) a diffusers-layout folder with randomly initialised weights and the
real architectures -- SD 1.5's UNet (block_out_channels 320/640/1280/1280, cross-attention 768,
860 M parameters), its VAE, a CLIP ViT-L/14 text encoder (768 wide, 12 layers, 77 tokens) and a
CLIP ViT-L/14 vision tower (1024 wide, 24 layers, 224 px) -- nothing is downloaded. The tokenizer
is a byte-level BPE learned here on real and pseudo words, with the real length (77) and
vocabulary size (49,408 when the learned merges reach it; the JSON records the size reached).
The encoder follows configs/sd15.yaml.

Stages, each measured in a fresh subprocess (so every peak belongs to one phase):
  pretrain     one pre-training step (encoder forward, diffusion loss, backward, AdamW) at the
               base resolution (512 px), batch 1
  personalize  the encoder's prediction plus --tune-steps tuning steps, dual path on, per
               --batch-sizes (tune.batch_size)
  generate     --sample-steps DDIM steps, one image, guidance 7.5, dual path on
  export       the encoder's concept (random offsets of the encoder's shapes) exported for stock
               diffusers and for kohya tools, and both LoRA files loaded by a stock diffusers
               pipeline of the same folder: finite and different UNet output with each LoRA
each with every --options entry: fp32, bf16, fp16, optionally "+ckpt" (gradient checkpointing).
Peak memory: on the CPU the process's resident-set high-water mark (VmHWM) after the models are
loaded and the counter reset ("peak") and over the whole process ("process peak", with loading);
on CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats. A child whose RSS passes
--max-rss-gb is killed and its row reads "not measured".

    python benchmarks/scale.py --out runs/scale --stages pretrain --options fp32,bf16+ckpt
    python benchmarks/scale.py --quick --out /tmp/scale           # tiny shapes, seconds (tests)

--arch sdxl builds SDXL base 1.0's architecture instead (UNet 2.6 B with the text_time added
embedding, CLIP ViT-L text + OpenCLIP bigG text with projection, 1024 px; weights written in bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("pretrain", "personalize", "generate", "export")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Architectures: SD 1.5 (the configs of stable-diffusion-v1-5 and openai/clip-vit-large-patch14),
# and "quick", the same block structure at tiny widths for tests.
ARCHS = {
    "sd15": {
        "unet": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                    norm_num_groups=32),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "tower": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        "vocab": 49408, "config": "sd15", "encoder": [],
    },
    "quick": {
        "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
                     cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4),
        "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, sample_size=64, norm_num_groups=4),
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=16, hidden_act="quick_gelu"),
        "tower": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu"),
        "vocab": 2000, "config": "tiny", "encoder": ["encoder.tower_layers=[-1,-2]"],
    },
    # SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's unet/vae/text_encoder(_2) configs):
    # 2.6 B UNet, CLIP ViT-L text + OpenCLIP bigG text with projection, 1024 px.
    "sdxl": {
        "unet": dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                     norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                    norm_num_groups=32, scaling_factor=0.13025),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       projection_dim=1280, hidden_act="gelu"),
        "tower": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        "vocab": 49408, "config": "sd15", "encoder": [],
    },
    # the SDXL block structure at tiny widths (tests of this script)
    "quick_sdxl": {
        "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16, 16),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                     use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                     norm_num_groups=4),
        "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, sample_size=64, norm_num_groups=4,
                    scaling_factor=0.13025),
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=16, hidden_act="quick_gelu"),
        "text_2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=16, hidden_act="gelu"),
        "tower": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu"),
        "vocab": 2000, "config": "tiny", "encoder": ["encoder.tower_layers=[-1,-2]"],
    },
}


# -- the model folder -------------------------------------------------------------------------
def _tokenizer(vocab_size: int):
    """Byte-level BPE in CLIP's format (word</w> tokens), learned on real and pseudo words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    from datencoder.testing import TINY_WORDS

    rng = random.Random(0)
    pseudo = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
              for _ in range(vocab_size)]
    chars = [chr(c) for c in range(33, 127)]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(chars), min_frequency=1, show_progress=False,
                                  initial_alphabet=chars, end_of_word_suffix="</w>", special_tokens=[BOS, EOS])
    bpe.train_from_iterator([" ".join([*TINY_WORDS, *pseudo])], trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = list(dict.fromkeys([*sorted(learned["vocab"], key=learned["vocab"].get), *chars,
                                *(c + "</w>" for c in chars)]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def _unet_kwargs(spec: dict) -> dict:
    unet = {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **spec["unet"]}
    return {"in_channels": 4, "out_channels": 4, **unet}


def meta_unet(arch: str):
    """The architecture's UNet on the meta device: every shape, no memory (``--count-heads``)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        if arch == "minisd":  # the embedded default base's own config
            from datencoder.io import ASSETS

            config = json.loads((ASSETS / "minisd-emoji" / "unet" / "config.json").read_text())
            return UNet2DConditionModel.from_config(config)
        return UNet2DConditionModel(**_unet_kwargs(ARCHS[arch]))


def head_counts(modes=("factorized", "core", "full")) -> list[dict]:
    """Hypernetwork weights per mode at each base's shipped encoder settings (minisd-emoji:
    minisd_encoder.yaml; SD 1.5 and SDXL: sd15.yaml, as the stages here use), counted from the
    meta-device UNet's shapes; ``refused``: the size limit (``encoder.max_head_fraction``) refuses it."""
    from datencoder.attention import target_layer_shapes
    from datencoder.config import load_config
    from datencoder.encoder import check_head_size, head_weight_counts
    from datencoder.errors import DatencoderError
    from datencoder.hypernetwork import TUNED_BY_HEADS

    rows = []
    for arch, config in (("minisd", "minisd_encoder"), ("sd15", "sd15"), ("sdxl", "sd15")):
        unet = meta_unet(arch)
        unet_weights = sum(p.numel() for p in unet.parameters())
        for mode in modes:
            enc = dataclasses.replace(load_config(config).encoder, hypernet_mode=mode)
            shapes = target_layer_shapes(unet, enc.targets, enc.attention_kinds)
            counts = head_weight_counts(enc, shapes)
            total = sum(counts.values())
            try:
                check_head_size(enc, shapes, unet_weights)
                refused = False
            except DatencoderError:
                refused = True
            embedding_head = (enc.hidden_dim + 1) * unet.config.cross_attention_dim  # token width(s)
            rows.append({"base": arch, "unet_weights": unet_weights, "mode": mode, "hidden_dim": enc.hidden_dim,
                         "rank": enc.rank, "layers": len(shapes), "hypernetwork_weights": total,
                         "fraction": total / unet_weights, "refused": refused,
                         "tune_heads_weights": embedding_head + sum(counts[p] for p in TUNED_BY_HEADS[mode])})
    return rows


def _head_table(rows: list[dict]) -> str:
    lines = ["| base | UNet weights | mode | hidden | layers | hypernetwork weights | % of UNet | size limit | "
             "tune_heads tunes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['base']} | {r['unet_weights']:,} | {r['mode']} | {r['hidden_dim']} | {r['layers']} | "
                     f"{r['hypernetwork_weights']:,} | {100 * r['fraction']:.2f} % | "
                     f"{'refused' if r['refused'] else 'passes'} | {r['tune_heads_weights']:,} |")
    return "\n".join(lines) + "\n"


def build_model(root: Path, arch: str) -> Path:
    """Write the random model folder (diffusers layout plus image_tower/); skipped when present."""
    if (root / "model_index.json").is_file():
        return root
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    spec = ARCHS[arch]
    torch.manual_seed(0)
    tokenizer = _tokenizer(spec["vocab"])

    def text_model(widths: dict, tok, cls=CLIPTextModel):
        return cls(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **widths))

    vae_spec = {"scaling_factor": 0.18215, **spec["vae"]}
    if "text_2" in spec:
        # SDXL at full size is 10 GB of fp32 weights: built and saved in bf16 (load_base casts to
        # the dtype asked for), so building fits beside other work on a 24 GB machine.
        torch.set_default_dtype(torch.bfloat16)
    unet = UNet2DConditionModel(**_unet_kwargs(spec))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **vae_spec)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    if "text_2" in spec:
        import copy

        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        tokenizer_2 = copy.deepcopy(tokenizer)  # one vocabulary; the second pads with "!" as OpenCLIP's
        tokenizer_2.pad_token = "!"
        text = text_model(spec["text"], tokenizer)
        text_2 = text_model(spec["text_2"], tokenizer_2, CLIPTextModelWithProjection)
        StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                  tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
                                  ).save_pretrained(root, safe_serialization=True)
        del text_2
        torch.set_default_dtype(torch.float32)
    else:
        text = text_model(spec["text"], tokenizer)
        StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                ).save_pretrained(root, safe_serialization=True)
    del unet, vae, text
    tower = CLIPVisionModel(CLIPVisionConfig(**spec["tower"]))
    tower.save_pretrained(root / "image_tower")
    size = spec["tower"]["image_size"]
    (root / "image_tower" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return root


# -- one measurement (runs in its own process) --------------------------------------------------
def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model: str, arch: str, stage: str, option: str, batch: int, args) -> dict:
    import torch

    from datencoder.base import load_base, resolve_device
    from datencoder.config import load_config
    from datencoder.cost import measure as measure_phase
    from datencoder.system import EncoderSystem

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = option.split("+")[0]
    ckpt = option.endswith("+ckpt")
    cfg = load_config(ARCHS[arch]["config"], [f"model.pretrained={model}", "model.image_tower=null",
                                              *ARCHS[arch]["encoder"], *_mode_overrides(args.hypernet_mode)])
    base = load_base(model, torch_dtype=dtype, device=device, with_image_tower=stage != "generate")
    if ckpt:
        base.unet.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 3, base.resolution, base.resolution, generator=gen) * 2 - 1).to(device)
    system = EncoderSystem(base, cfg) if stage != "generate" else None
    load_peak = _vm_hwm_mb()
    cpu_start = time.process_time()
    with measure_phase(device) as phase:  # the harness's measure: CUDA allocator or VmHWM, reset here
        if stage == "pretrain":
            optimizer = torch.optim.AdamW(system.encoder.parameters(), lr=1e-4)
            terms = system.training_terms(pixels, ["a photo of S*"], gen)
            sum(terms.values()).backward()
            optimizer.step()
            finite = all(bool(torch.isfinite(v)) for v in terms.values())
        elif stage == "personalize":
            from datencoder.tuning import personalize

            tune = dataclasses.replace(cfg.tune, steps=args.tune_steps, batch_size=batch, gradient_checkpointing=ckpt)
            concept = personalize(system, pixels[0], tune)
            finite = bool(torch.isfinite(concept.embedding).all())
        elif stage == "export":
            finite = _export_and_load(system, pixels[0], cfg, model, dtype, device)
        else:
            finite = _generate(base, cfg, args.sample_steps)
    seconds, peak = phase.seconds, phase.peak_mb
    return {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu_start, 2), "peak_mb": round(peak), "process_peak_mb": round(max(load_peak, _vm_hwm_mb())),
            "finite": finite, "status": "measured", "hypernet_mode": cfg.encoder.hypernet_mode}


def _mode_overrides(mode: str | None) -> list[str]:
    """``--hypernet-mode``: the encoder's hypernetwork; ``full`` lifts the size limit it would fail."""
    if mode is None:
        return []
    return [f"encoder.hypernet_mode={mode}", *(["encoder.max_head_fraction=null"] if mode == "full" else [])]


def _random_factors(unet, cfg, gen) -> dict:
    """Small random (A, B) for every offset target (an untrained encoder predicts B = 0)."""
    import torch

    from datencoder.attention import target_layer_shapes

    return {name: (0.01 * torch.randn(cfg.encoder.rank, fan_in, generator=gen),
                   0.01 * torch.randn(fan_out, cfg.encoder.rank, generator=gen))
            for name, (fan_in, fan_out) in target_layer_shapes(unet, cfg.encoder.targets,
                                                               cfg.encoder.attention_kinds).items()}


def _export_and_load(system, pixels, cfg, model: str, dtype: str, device) -> bool:
    """Export a concept both ways and load each LoRA into a stock diffusers pipeline of ``model``."""
    import tempfile

    import torch
    from diffusers import DiffusionPipeline

    from datencoder.export import LORA_FILE, export_concept
    from datencoder.tuning import personalize

    concept = personalize(system, pixels, dataclasses.replace(cfg.tune, steps=0))
    concept.factors = _random_factors(system.base.unet, cfg, torch.Generator().manual_seed(1))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype).to(device)
    unet = pipe.unet
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                         generator=gen).to(device, torch_dtype)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(device, torch_dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, dtype=torch_dtype, device=device),
                                       "time_ids": torch.zeros(1, 6, dtype=torch_dtype, device=device)}}

    @torch.no_grad()
    def out():
        return unet(sample, 500, encoder_hidden_states=context, **extra).sample.float()

    plain, ok = out(), True
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("diffusers", "kohya"):
            folder = export_concept(concept, Path(tmp) / fmt, fmt)
            weight = LORA_FILE if fmt == "diffusers" else next(folder.glob("*_lora.safetensors")).name
            pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=fmt)
            pipe.set_adapters([fmt])
            with_lora = out()
            ok = ok and bool(torch.isfinite(with_lora).all()) and not torch.equal(with_lora, plain)
            print(json.dumps({"format": fmt, "max_abs_change": float((with_lora - plain).abs().max())}),
                  file=sys.stderr)
    return ok


def _generate(base, cfg, steps: int) -> bool:
    """25-step dual-path generation with a concept of random factors of the encoder's shapes."""
    import torch

    from datencoder.concept import Concept
    from datencoder.pipeline import ConceptPipeline

    gen = torch.Generator().manual_seed(1)
    factors = _random_factors(base.unet, cfg, gen)
    widths = [enc.get_input_embeddings().weight.shape[1]
              for enc in (base.text_encoder, getattr(base, "text_encoder_2", None)) if enc is not None]
    concept = Concept(embedding=0.01 * torch.randn(sum(widths), generator=gen), factors=factors, hard_word="dog",
                      base={"name": base.name, "fingerprint": base.fingerprint}, token_dims=tuple(widths))
    images = ConceptPipeline(base, concept)("a photo of S* on the beach", num_images_per_prompt=1,
                                            num_inference_steps=steps, guidance_scale=7.5, output_type="pt").images
    return bool(torch.isfinite(images.float()).all())


# -- the driver -------------------------------------------------------------------------------
def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _run_child(argv: list[str], limit_gb: float) -> dict:
    """One measurement in a fresh interpreter, killed if its RSS passes ``limit_gb``."""
    child = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    worst = 0.0
    while child.poll() is None:
        worst = max(worst, _rss_gb(child.pid))
        if worst > limit_gb:
            child.send_signal(signal.SIGKILL)
            child.wait()
            return {"status": "not measured", "note": f"RSS passed the {limit_gb:.1f} GB limit (killed)"}
        time.sleep(0.2)
    out = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not out:
        return {"status": "not measured", "note": f"child exited with status {child.returncode}"}
    return json.loads(out[-1])


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _table(rows: list[dict]) -> str:
    lines = ["| stage | steps | batch | base dtype | grad. ckpt | seconds | CPU seconds | peak MB | process peak MB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['steps']} | {r['batch']} | {r['option'].split('+')[0]} | "
                     f"{'yes' if r['option'].endswith('+ckpt') else 'no'} | {r.get('seconds', '-')} | "
                     f"{r.get('cpu_seconds', '-')} | "
                     f"{r.get('peak_mb', '-')} | {r.get('process_peak_mb', '-')} | "
                     f"{r['status']}{': ' + r['note'] if r.get('note') else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for model/, results.jsonl and table.md (required)")
    parser.add_argument("--count-heads", action="store_true",
                        help="print the hypernetwork's weights per mode at minisd-emoji, SD 1.5 and SDXL shapes "
                             "(meta device: no memory, seconds) and stop")
    parser.add_argument("--hypernet-mode", default=None, choices=("factorized", "core", "full"),
                        help="the encoder's encoder.hypernet_mode (default: the config's, factorized)")
    parser.add_argument("--model", default=None, help="an existing model folder (default: build OUT/model)")
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"),
                        help="sd15 (512 px, default) or sdxl (1024 px, two text encoders)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes with the same structure (tests)")
    parser.add_argument("--stages", default="all", help=f"comma list of {', '.join(STAGES)}, or all")
    parser.add_argument("--options", default="fp32,bf16+ckpt",
                        help="comma list of base precisions (fp32, bf16, fp16), each optionally +ckpt")
    parser.add_argument("--batch-sizes", default="1,4", help="tune.batch_size values of personalize")
    parser.add_argument("--tune-steps", type=int, default=12)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--max-rss-gb", type=float, default=None,
                        help="kill a measurement past this RSS (default: available memory minus 2 GB)")
    parser.add_argument("--report", action="store_true", help="rewrite table.md from every row of results.jsonl")
    parser.add_argument("--build-only", action="store_true", help="write the model folder and stop")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (tests; peaks not per phase)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_heads:
        print(_head_table(head_counts()), end="")
        return 0
    if args.out is None:
        parser.error("--out is required")
    arch = ("quick_" + args.arch if args.arch != "sd15" else "quick") if args.quick else args.arch
    if args.child:  # a measurement subprocess: print one JSON line
        job = json.loads(args.child)
        print(json.dumps(measure(job["model"], arch, job["stage"], job["option"], job["batch"], args)))
        return 0
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        table = _table(_read_rows(out / "results.jsonl"))
        (out / "table.md").write_text(table)
        print(table)
        return 0
    model = args.model or str(build_model(out / "model", arch))
    if args.build_only:
        return 0
    jobs = []
    for stage in stages:
        for option in args.options.split(","):
            if stage == "generate":
                option = option.split("+")[0]  # no backward pass in generation: checkpointing is moot
            for batch in [int(b) for b in args.batch_sizes.split(",")] if stage == "personalize" else [1]:
                if (stage, option, batch) not in jobs:
                    jobs.append((stage, option, batch))
    rows = []
    for stage, option, batch in jobs:
        row = {"stage": stage, "option": option, "batch": batch, "arch": arch, "threads": args.threads,
               "steps": {"personalize": args.tune_steps, "generate": args.sample_steps}.get(stage, 1),
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        print(f"{stage} {option} batch {batch} ...", file=sys.stderr, flush=True)
        if args.in_process:
            row.update(measure(model, arch, stage, option, batch, args))
        else:
            limit = args.max_rss_gb or _mem_available_gb() - 2.0
            job = json.dumps({"model": model, "stage": stage, "option": option, "batch": batch})
            child = ["--child", job, "--out", str(out), "--device", args.device, "--threads", str(args.threads),
                     "--tune-steps", str(args.tune_steps), "--sample-steps", str(args.sample_steps),
                     *(["--hypernet-mode", args.hypernet_mode] if args.hypernet_mode else [])]
            row.update(_run_child(child + ["--arch", args.arch] + (["--quick"] if args.quick else []), limit))
        rows.append(row)
        with (out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    (out / "table.md").write_text(_table(rows))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
