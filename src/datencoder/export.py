"""Export a concept for stock diffusers: a LoRA plus a textual-inversion embedding.

The LoRA is written by diffusers' own ``StableDiffusionPipeline.save_lora_weights`` (keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` plus the PEFT ``LoraConfig`` as adapter
metadata), so ``pipe.load_lora_weights(folder)`` reads it back; the embedding of S* is written as
``learned_embeds.safetensors`` holding ``{token: [D]}``, the layout ``pipe.load_textual_inversion``
reads.

SDXL concepts (two text encoders) are written by ``StableDiffusionXLPipeline.save_lora_weights``
and the embedding in the layout SDXL embeddings are shared in (AUTOMATIC1111, ComfyUI, diffusers'
documentation): ``{"clip_l": [1, D1], "clip_g": [1, D2]}``, one ``load_textual_inversion`` call per
text encoder.

The export is *single path* (``a = 1``): stock diffusers has no way to blend a second, vanilla
attention pass with a hard prompt, so the dual-path blend of the concept (METHOD.md, "Dual path")
is dropped. Generation from the export equals ``ConceptPipeline(..., dual_path=False)``.

PEFT scales the offset by ``lora_alpha / r``; the concept's offset is ``scale * B @ A``
(``lora.delta_weight``), so ``lora_alpha = r * scale`` gives the same effective offset.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .concept import Concept
from .errors import DatencoderError

__all__ = ["export_concept", "export_diffusers", "FORMATS", "LORA_FILE", "EMBEDDING_FILE"]

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
README_FILE = "README.txt"


def _lora_state_and_metadata(concept: Concept) -> tuple[dict, dict]:
    """UNet LoRA state dict (PEFT key names, no ``unet.`` prefix) and its LoraConfig as a dict."""
    from peft import LoraConfig

    ranks = {A.shape[0] for A, _ in concept.factors.values()}
    if len(ranks) != 1:
        raise DatencoderError(f"the concept's factors have mixed ranks {sorted(ranks)}; re-create the concept")
    rank = ranks.pop()
    state = {}
    for name, (A, B) in sorted(concept.factors.items()):
        state[f"{name}.lora_A.weight"] = A.detach().float().contiguous().cpu()  # [r, in]
        state[f"{name}.lora_B.weight"] = B.detach().float().contiguous().cpu()  # [out, r]
    config = LoraConfig(
        r=rank, lora_alpha=rank * float(concept.scale), target_modules=sorted(concept.factors),
        init_lora_weights=False, lora_dropout=0.0, bias="none",
    )
    return state, config.to_dict()


def _is_sdxl(concept: Concept) -> bool:
    if len(concept.token_dims) > 2:
        raise DatencoderError(f"the concept has {len(concept.token_dims)} text-encoder embeddings; "
                              "export knows one (SD 1.x/2.x) or two (SDXL)")
    return len(concept.token_dims) == 2


def _embedding_tensors(concept: Concept) -> dict:
    parts = [p.detach().float().contiguous().cpu() for p in concept.embedding_parts()]
    if _is_sdxl(concept):
        return {"clip_l": parts[0].unsqueeze(0), "clip_g": parts[1].unsqueeze(0)}  # [1, D1], [1, D2]
    return {concept.token: parts[0]}  # [D]


def _readme(concept: Concept, has_lora: bool) -> str:
    base, token = concept.base.get("name", "?"), concept.token
    sdxl = _is_sdxl(concept)
    layout = "clip_l/clip_g (one vector per text encoder)" if sdxl else "diffusers"
    files = [f"  {EMBEDDING_FILE}: textual-inversion embedding of the token {token}, {layout} layout"]
    if sdxl:
        code = [
            "    from diffusers import StableDiffusionXLPipeline",
            "    from safetensors.torch import load_file",
            f"    pipe = StableDiffusionXLPipeline.from_pretrained({base!r})",
            "    folder = '<this folder>'",
            f"    emb = load_file(folder + '/{EMBEDDING_FILE}')",
            f"    pipe.load_textual_inversion(emb['clip_l'], token={token!r}, text_encoder=pipe.text_encoder, "
            "tokenizer=pipe.tokenizer)",
            f"    pipe.load_textual_inversion(emb['clip_g'], token={token!r}, text_encoder=pipe.text_encoder_2, "
            "tokenizer=pipe.tokenizer_2)",
            f"    image = pipe('a photo of {token}').images[0]",
        ]
    else:
        code = [
            "    from diffusers import StableDiffusionPipeline",
            f"    pipe = StableDiffusionPipeline.from_pretrained({base!r}, safety_checker=None)",
            "    folder = '<this folder>'",
            f"    pipe.load_textual_inversion(folder, token={token!r})",
            f"    image = pipe('a photo of {token}').images[0]",
        ]
    if has_lora:
        files.insert(0, f"  {LORA_FILE}: UNet LoRA (diffusers save_lora_weights format, PEFT adapter metadata)")
        code.insert(code.index("    folder = '<this folder>'") + 1, "    pipe.load_lora_weights(folder)")
    return "\n".join([
        "Concept exported by datencoder for stock diffusers.", "", "Files:", *files, "",
        f"Base model: {base} (fingerprint {concept.base.get('fingerprint', '?')}).",
        "Use the same base model the concept was made with.", "", "Load it:", "", *code, "",
        f"Write {token} where datencoder prompts use {concept.placeholder}.", "",
        "Single path only. datencoder samples with the dual-path blend",
        f"(a = {concept.blend_self} for self-, {concept.blend_cross} for cross-attention): each attention "
        "layer runs a second",
        "time with the vanilla weights and the hard prompt (the placeholder replaced by the nearest word",
        f"{concept.hard_word!r}). Stock diffusers has no equivalent, so this export is the concept with a = 1;",
        "it matches `datencoder generate ... --no-dual-path`, not the default dual path.", "",
    ])


def export_diffusers(concept: Concept, out_dir: str | Path) -> Path:
    """Write the concept as a diffusers LoRA + textual-inversion embedding + README.txt."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    _is_sdxl(concept)  # refuse an unknown text-encoder layout before writing anything
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatencoderError(f"--out {out_dir} is a file; pass a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything is written to a hidden folder beside the targets, then each file is moved into
    # place with os.replace, so a crash never leaves a half-written file under its real name.
    staging = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    try:
        has_lora = bool(concept.factors)
        if has_lora:
            state, metadata = _lora_state_and_metadata(concept)
            pipeline = StableDiffusionXLPipeline if _is_sdxl(concept) else StableDiffusionPipeline
            pipeline.save_lora_weights(
                staging, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, weight_name=LORA_FILE,
            )
        save_file(_embedding_tensors(concept), str(staging / EMBEDDING_FILE), metadata={"format": "pt"})
        (staging / README_FILE).write_text(_readme(concept, has_lora))
        names = ([LORA_FILE] if has_lora else []) + [EMBEDDING_FILE, README_FILE]
        for name in names:
            os.replace(staging / name, out_dir / name)
        if not has_lora and (out_dir / LORA_FILE).exists():
            os.unlink(out_dir / LORA_FILE)  # a stale LoRA from an earlier export would be wrong
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.debug("exported %d LoRA layers and the embedding of %s to %s", len(concept.factors), concept.token, out_dir)
    return out_dir


FORMATS = {"diffusers": export_diffusers}


def export_concept(concept: Concept, out_dir: str | Path, format: str = "diffusers") -> Path:
    """Export ``concept`` to ``out_dir`` in one of ``FORMATS``."""
    if format not in FORMATS:
        raise DatencoderError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[format](concept, out_dir)
