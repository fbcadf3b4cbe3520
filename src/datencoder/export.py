"""Export a concept for stock diffusers: a LoRA plus a textual-inversion embedding.

The LoRA is written by diffusers' own ``StableDiffusionPipeline.save_lora_weights`` (keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` plus the PEFT ``LoraConfig`` as adapter
metadata), so ``pipe.load_lora_weights(folder, weight_name=LORA_FILE)`` reads it back; the
embedding of S* is written as ``learned_embeds.safetensors`` holding ``{token: [D]}``, the layout
``pipe.load_textual_inversion`` reads.

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
from pathlib import Path

from .concept import Concept
from .errors import DatencoderError
from .export_base import (borrows_parts, concept_sample, embedding_code, generate_flags, is_sdxl_concept, load_code,
                          sample_code)
from .export_kohya import export_kohya, kohya_stem
from .io import atomic_dir, check_replaceable, save_file_atomic, write_atomic, write_text_atomic

__all__ = ["export_concept", "export_diffusers", "export_size", "FORMATS", "LORA_FILE", "EMBEDDING_FILE"]

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


def _embedding_tensors(concept: Concept) -> dict:
    parts = [p.detach().float().contiguous().cpu() for p in concept.embedding_parts()]
    if is_sdxl_concept(concept):
        return {"clip_l": parts[0].unsqueeze(0), "clip_g": parts[1].unsqueeze(0)}  # [1, D1], [1, D2]
    return {concept.token: parts[0]}  # [D]


def _readme(concept: Concept, has_lora: bool, folder: Path) -> str:
    base, token, sdxl = concept.base.get("name", "?"), concept.token, is_sdxl_concept(concept)
    sample = concept_sample(concept)
    layout = " (clip_l/clip_g: one vector per text encoder)" if sdxl else ""
    files = [f"  {EMBEDDING_FILE}: textual-inversion embedding of the token {token}{layout}"]
    if has_lora:
        files.insert(0, f"  {LORA_FILE}: UNet LoRA (diffusers save_lora_weights format, PEFT adapter metadata)")
    embedding = (embedding_code(f"folder + '/{EMBEDDING_FILE}'", token, True) if sdxl
                 else [f"pipe.load_textual_inversion(folder, token={token!r})"])
    code = [*load_code(base, sdxl=sdxl), f"folder = {str(folder)!r}",
            # weight_name named: without it diffusers (0.34-0.38) refuses a local folder when HF_HUB_OFFLINE=1
            *([f"pipe.load_lora_weights(folder, weight_name={LORA_FILE!r})"] if has_lora else []), *embedding,
            *sample_code(f"a photo of {token} on the beach", sample)]
    standalone = ([f"Or write the base once as a standalone folder, `datencoder export-base {base} --out DIR`,",
                   "and load it with StableDiffusionPipeline.from_pretrained(DIR) instead.", ""]
                  if borrows_parts(base) else [])
    return "\n".join([
        "Concept exported by datencoder for stock diffusers.", "", "Files:", *files, "",
        f"Base model: {base} (fingerprint {concept.base.get('fingerprint', '?')}).",
        "Use the same base model the concept was made with.", "", "Load it:", "", *(f"    {c}" for c in code), "",
        "This is the image of `datencoder generate <concept folder> \"a photo of "
        f"{concept.placeholder} on the beach\" --no-dual-path {generate_flags(sample)}`",
        "(the concept's own sampling settings, spelled out).",
        f"Write {token} where datencoder prompts use {concept.placeholder}.", "", *standalone,
        "Single path only. datencoder samples with the dual-path blend",
        f"(a = {concept.blend_self} for self-, {concept.blend_cross} for cross-attention): each attention "
        "layer runs a second",
        "time with the vanilla weights and the hard prompt (the placeholder replaced by the nearest word",
        f"{concept.hard_word!r}). Stock diffusers has no equivalent, so this export is the concept with a = 1;",
        "it matches `datencoder generate ... --no-dual-path`, not the default dual path.", "",
    ])


def export_diffusers(concept: Concept, out_dir: str | Path, final: str | Path | None = None) -> Path:
    """Write the concept as a diffusers LoRA + textual-inversion embedding + README.txt into
    ``out_dir`` (an empty folder; ``final``: where it will live, named in the README)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    is_sdxl_concept(concept)  # refuse an unknown text-encoder layout before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_lora = bool(concept.factors)
    if has_lora:
        state, metadata = _lora_state_and_metadata(concept)
        pipeline = StableDiffusionXLPipeline if is_sdxl_concept(concept) else StableDiffusionPipeline
        # diffusers writes <folder>/<weight_name>; the temp name keeps its metadata handling ours
        write_atomic(out_dir / LORA_FILE, lambda tmp: pipeline.save_lora_weights(
            Path(tmp).parent, unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
            weight_name=Path(tmp).name))
    save_file_atomic(out_dir / EMBEDDING_FILE, _embedding_tensors(concept), metadata={"format": "pt"})
    write_text_atomic(out_dir / README_FILE, _readme(concept, has_lora, Path(final or out_dir).resolve()))
    log.debug("exported %d LoRA layers and the embedding of %s to %s", len(concept.factors), concept.token, out_dir)
    return out_dir


FORMATS = {"diffusers": export_diffusers, "kohya": export_kohya}


def export_size(concept: Concept) -> int:
    """Bytes an export of ``concept`` takes, about: its tensors in fp32, plus headers and the README."""
    tensors = [concept.embedding, *(t for pair in concept.factors.values() for t in pair)]
    return 4 * sum(t.numel() for t in tensors) + 2**16


def _export_names(out_dir: Path) -> set[str]:
    """Every file name an export of either format writes in ``out_dir``."""
    stem = kohya_stem(out_dir)
    return {LORA_FILE, EMBEDDING_FILE, README_FILE, f"{stem}_lora.safetensors", f"{stem}.safetensors"}


def export_concept(concept: Concept, out_dir: str | Path, format: str = "diffusers", overwrite: bool = True) -> Path:
    """Export ``concept`` to ``out_dir`` in one of ``FORMATS``.

    The folder is written whole beside ``out_dir`` and swapped in (``io.atomic_dir``): a kill leaves
    the earlier export or the new one, never a mix of the two. A folder holding other files is
    refused (it would be replaced); an earlier export is replaced only with ``overwrite``."""
    if format not in FORMATS:
        raise DatencoderError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatencoderError(f"--out {out_dir} is a file; pass a folder")
    check_replaceable(out_dir, _export_names(out_dir), "concept export")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DatencoderError(f"--out {out_dir} already holds an export; pass --overwrite to replace it "
                              "or choose another --out")
    with atomic_dir(out_dir) as tmp:
        FORMATS[format](concept, tmp, out_dir)
    return out_dir
