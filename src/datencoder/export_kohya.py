"""Export a concept for AUTOMATIC1111 and ComfyUI: a kohya-layout LoRA plus an A1111 embedding.

Two files, both named after the output folder ``NAME`` (A1111 uses a file's name as the word that
calls it up):

- ``NAME_lora.safetensors``, the LoRA in the key layout of kohya-ss/sd-scripts that A1111, ComfyUI
  and diffusers' kohya converter read: per UNet projection ``lora_unet_<module>.lora_down.weight``
  (A [r, in]), ``.lora_up.weight`` (B [out, r]), both fp16, and ``.alpha`` with
  ``alpha / r = scale`` so that the tools' ``up @ down * alpha / r`` is the concept's offset
  ``scale * B @ A`` (``lora.delta_weight``). ``alpha`` stays fp32: ``r * scale`` is rarely an fp16
  number and every reader calls ``.item()`` on it.
  ``<module>`` is the diffusers module path with ``.`` -> ``_`` for SD 1.x/2.x (kohya trains those
  on the diffusers UNet), and the original (sgm/LDM) path for SDXL (``input_blocks.4.1...``), which
  is what kohya writes for SDXL and what diffusers maps back with ``_maybe_map_sgm_blocks_to_diffusers``.
- ``NAME.safetensors``, the embedding of S* in the A1111 textual-inversion layout:
  ``{"emb_params": [1, D]}`` for one text encoder, ``{"clip_l": [1, 768], "clip_g": [1, 1280]}``
  for SDXL's two.

Single path, like the diffusers export (METHOD.md "Dual path" cannot be written as a plain LoRA).
A1111 and ComfyUI only run CLIP-conditioned models, so a base with another text encoder (the
embedded MiniLM default) is refused. SDXL concepts hold one embedding per text encoder, written as
``clip_l``/``clip_g``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from .io import save_file_atomic, write_text_atomic
from .concept import Concept
from .errors import DatencoderError
from .export_base import concept_sample, embedding_code, generate_flags, is_sdxl_concept, load_code, sample_code

__all__ = ["export_kohya", "kohya_stem", "kohya_lora_tensors", "kohya_module_name", "a1111_embedding_tensors", "is_sdxl"]

log = logging.getLogger(__name__)

_CLIP_TYPES = {"clip_text_model", "clip"}


def is_sdxl(unet_config) -> bool:
    """SDXL's UNet takes pooled text and size/crop ids through a "text_time" added embedding."""
    return unet_config.get("addition_embed_type") == "text_time"


def _sgm_path(name: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> the original (sgm/LDM) path kohya uses for SDXL.

    Input block i of the sgm UNet is conv_in (i = 0), then per down block ``layers_per_block``
    (resnet, attention) pairs and a downsampler; output blocks hold ``layers_per_block + 1`` pairs
    per up block; attention is entry 1 of a pair. The inverse of diffusers' own mapping.
    """
    parts = name.split(".")
    per_block = layers_per_block + 1
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4 and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            return ".".join(["input_blocks", str(1 + block * per_block + layer), "1", *parts[4:]])
        return ".".join(["output_blocks", str(block * per_block + layer), "1", *parts[4:]])
    if parts[:3] == ["mid_block", "attentions", "0"]:
        return ".".join(["middle_block", "1", *parts[3:]])
    raise DatencoderError(f"cannot name UNet module {name!r} in the SDXL (sgm) layout; only attention layers export")


def kohya_module_name(name: str, unet_config) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_..._to_q``."""
    if is_sdxl(unet_config):
        layers = unet_config.get("layers_per_block")
        if not isinstance(layers, int):
            raise DatencoderError(f"SDXL UNet with per-block layers_per_block {layers}; kohya names need one value")
        name = _sgm_path(name, layers)
    return "lora_unet_" + name.replace(".", "_")


def kohya_lora_tensors(factors: dict[str, tuple[Tensor, Tensor]], scale: float, unet_config,
                       dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The kohya state dict of the factors {module: (A [r, in], B [out, r])} with offset scale * B @ A."""
    out = {}
    for name, (A, B) in sorted(factors.items()):
        key = kohya_module_name(name, unet_config)
        out[f"{key}.lora_down.weight"] = A.detach().to("cpu", dtype).contiguous()  # [r, in]
        out[f"{key}.lora_up.weight"] = B.detach().to("cpu", dtype).contiguous()  # [out, r]
        out[f"{key}.alpha"] = torch.tensor(A.shape[0] * float(scale), dtype=torch.float32)  # alpha / r = scale
    return out


def a1111_embedding_tensors(embedding: Tensor, embedding_2: Tensor | None = None) -> dict[str, Tensor]:
    """A1111 textual inversion: ``emb_params`` [1, D]; with SDXL's second encoder ``clip_l``/``clip_g``."""
    first = embedding.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()  # [1, D]
    if embedding_2 is None:
        return {"emb_params": first}
    return {"clip_l": first, "clip_g": embedding_2.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()}


def _base_configs(name: str) -> tuple[dict, str]:
    """The UNet config and the text encoder's model_type of the concept's base, without loading weights."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig

    from .base import _package_path, _read_base_json, _resolve

    root, local = _resolve(name)
    try:
        unet_config = dict(UNet2DConditionModel.load_config(str(root), subfolder="unet"))
        package = _read_base_json(root, local).get("text_encoder", {}).get("python_package")
        source, sub = (_package_path(package), "") if package else (str(root), "text_encoder")
        text_type = AutoConfig.from_pretrained(source, **({"subfolder": sub} if sub else {})).model_type
    except DatencoderError:
        raise
    except Exception as err:  # hub/config loaders raise many types
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DatencoderError(f"could not read the configs of base model '{name}' ({line}); "
                              "the kohya key names come from its UNet config") from err
    return unet_config, text_type


def kohya_stem(out_dir: Path) -> str:
    """The file stem (and token) of a kohya export: the folder's name, made safe."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", out_dir.resolve().name).strip("_")
    return stem or "concept"


def _readme(concept: Concept, stem: str, folder: Path) -> str:
    base, sdxl = concept.base.get("name", "?"), is_sdxl_concept(concept)
    return "\n".join([
        "Concept exported by datencoder for AUTOMATIC1111 / ComfyUI (kohya LoRA + A1111 embedding).", "",
        "Files:",
        f"  {stem}_lora.safetensors: UNet LoRA, kohya keys (lora_unet_*.lora_down/lora_up fp16, .alpha)",
        f"  {stem}.safetensors: embedding of S* in the A1111 textual-inversion layout "
        f"({'clip_l, clip_g' if sdxl else 'emb_params'})", "",
        f"Base model: {base} (fingerprint {concept.base.get('fingerprint', '?')}); use the same model.", "",
        "AUTOMATIC1111: copy the LoRA into models/Lora/ and the embedding into embeddings/, then prompt",
        f"    <lora:{stem}_lora:1> a photo of {stem} on the beach",
        "ComfyUI: the LoRA into models/loras/ (LoraLoader, strength 1), the embedding into",
        f"models/embeddings/, and prompt  a photo of embedding:{stem} on the beach", "",
        "diffusers (reads the kohya layout too):", "",
        *(f"    {line}" for line in [
            *load_code(base, sdxl=sdxl), f"folder = {str(folder)!r}",
            f"pipe.load_lora_weights(folder, weight_name='{stem}_lora.safetensors')",
            *embedding_code(f"folder + '/{stem}.safetensors'", stem, sdxl),
            *sample_code(f"a photo of {stem} on the beach", concept_sample(concept))]), "",
        f"Write {stem} where datencoder prompts use {concept.placeholder}. Single path only: datencoder",
        f"samples with the dual-path blend (a = {concept.blend_self} self-, {concept.blend_cross} cross-attention,",
        f"hard word {concept.hard_word!r}); a plain LoRA cannot express it, so this file is the concept with",
        "a = 1 and matches `datencoder generate ... --no-dual-path "
        f"{generate_flags(concept_sample(concept))}`.", "The LoRA is fp16 (the concept is fp32).", "",
    ])


def export_kohya(concept: Concept, out_dir: str | Path, final: str | Path | None = None) -> Path:
    """Write ``NAME_lora.safetensors`` + ``NAME.safetensors`` + README.txt into ``out_dir`` (an empty
    folder; ``final``: where it will live, which names NAME and is named in the README)."""
    out_dir = Path(out_dir)
    final = Path(final or out_dir)
    unet_config, text_type = _base_configs(concept.base.get("name", ""))
    if text_type not in _CLIP_TYPES:
        raise DatencoderError(f"--format kohya needs a CLIP text encoder (A1111/ComfyUI run only those); "
                              f"the base's is {text_type!r}: use --format diffusers")
    if is_sdxl(unet_config) != is_sdxl_concept(concept):
        raise DatencoderError("the concept's embeddings do not fit its base model's text encoders; re-create it")
    lora = kohya_lora_tensors(concept.factors, concept.scale, unet_config)
    ranks = sorted({int(A.shape[0]) for A, _ in concept.factors.values()})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": ",".join(map(str, ranks)),
                "ss_network_alpha": str(ranks[0] * float(concept.scale)) if len(ranks) == 1 else "per layer"}
    stem = kohya_stem(final)
    out_dir.mkdir(parents=True, exist_ok=True)
    if lora:
        save_file_atomic(out_dir / f"{stem}_lora.safetensors", lora, metadata)
    save_file_atomic(out_dir / f"{stem}.safetensors", a1111_embedding_tensors(*concept.embedding_parts()))
    write_text_atomic(out_dir / "README.txt", _readme(concept, stem, final.resolve()))
    log.debug("exported %d LoRA layers (kohya) and the A1111 embedding %s to %s", len(concept.factors), stem, out_dir)
    return out_dir
