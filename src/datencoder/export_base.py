"""Loading code for stock diffusers, and a base model written as a complete diffusers pipeline folder.

Two ways to use a datencoder base outside datencoder:

- :func:`load_code` is the Python that builds the exact pipeline datencoder samples with (the one
  a concept export's README.txt prints). A base that borrows its text encoder and tokenizer from a
  Python package (``datencoder_base.json``, as the embedded ``minisd-emoji`` borrows the MiniLM)
  has no ``model_index.json``, so ``from_pretrained`` cannot load it; the code assembles the
  pipeline from its parts, with the tokenizer length datencoder uses (32 for minisd-emoji; the
  package's own 256 changes every image).
- :func:`export_base` writes the base as a standalone folder (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/, plus image_tower/ when the base has one) that
  ``StableDiffusionPipeline.from_pretrained(folder)`` loads as is and datencoder accepts as
  ``--base`` with the same fingerprint. Weights are written fp32 (the loaded precision), so the
  minisd-emoji folder is 150 MB; it is never written into the package.

Either way the scheduler is DDIM built from the base's own scheduler config, as
``ConceptPipeline`` builds it (``generate --scheduler ddim``, the default): a DDIM swapped in with
the class defaults instead (``clip_sample=True``, ...) changes the images.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .base import DEFAULT_BASE, SHIPPED_BASES, BaseModel, _read_base_json, _resolve
from .io import atomic_dir, write_text_atomic
from .errors import DatencoderError

__all__ = ["export_base", "check_export_dir", "pipeline_bytes", "load_code", "sample_code", "generate_flags",
           "concept_sample", "borrows_parts", "assembly_readme", "is_sdxl_concept", "embedding_code"]

log = logging.getLogger(__name__)

README_FILE = "README.txt"


def _spec(base_name: str) -> tuple[Path | str, bool, dict]:
    try:
        root, local = _resolve(base_name)
        return root, local, _read_base_json(root, local)
    except DatencoderError:  # the base is not here (moved, or a hub id not cached): the plain form
        return base_name, False, {}


def borrows_parts(base_name: str) -> bool:
    """True when the base takes its text encoder or tokenizer from a package (no model_index.json)."""
    spec = _spec(base_name)[2]
    return any(spec.get(part, {}).get("python_package") for part in ("text_encoder", "tokenizer"))


def is_sdxl_concept(concept) -> bool:
    """True for a concept with one embedding per SDXL text encoder; one or two are all there are."""
    if len(concept.token_dims) > 2:
        raise DatencoderError(f"the concept has {len(concept.token_dims)} text-encoder embeddings; "
                              "export knows one (SD 1.x/2.x) or two (SDXL)")
    return len(concept.token_dims) == 2


def embedding_code(path_expr: str, token: str, sdxl: bool) -> list[str]:
    """Lines loading a textual-inversion file; SDXL's clip_l/clip_g: one call per text encoder."""
    if not sdxl:
        return [f"pipe.load_textual_inversion({path_expr}, token={token!r})"]
    return ["from safetensors.torch import load_file",
            f"emb = load_file({path_expr})",
            f"pipe.load_textual_inversion(emb['clip_l'], token={token!r}, text_encoder=pipe.text_encoder, "
            "tokenizer=pipe.tokenizer)",
            f"pipe.load_textual_inversion(emb['clip_g'], token={token!r}, text_encoder=pipe.text_encoder_2, "
            "tokenizer=pipe.tokenizer_2)"]


def sample_code(prompt: str, sample=None) -> list[str]:
    """The sampling call matching ``datencoder generate PROMPT`` with ``sample``'s settings
    (a ``SampleConfig``; its defaults when None) and one image: the flags ``generate_flags`` names."""
    from .config import SampleConfig

    sample = sample or SampleConfig()
    extra = "".join(f", {name}={value!r}" for name, value in (
        ("negative_prompt", sample.negative_prompt or None), ("height", sample.height), ("width", sample.width))
        if value is not None)
    return [f"image = pipe({prompt!r}, num_inference_steps={sample.steps}, guidance_scale={sample.guidance}{extra},",
            f"             generator=torch.Generator().manual_seed({sample.seed})).images[0]"]


def concept_sample(concept):
    """The SampleConfig ``generate`` uses for ``concept`` without flags: the concept's ``sample``."""
    from .config import SampleConfig, from_dict

    return from_dict(SampleConfig, (concept.config or {}).get("sample"))


def generate_flags(sample) -> str:
    """The ``datencoder generate`` flags that pin every setting ``sample_code`` uses (so the named
    command makes the same image whatever the concept's own defaults are)."""
    flags = [f"--num-images 1 --seed {sample.seed} --steps {sample.steps} --guidance {sample.guidance}",
             "--scheduler ddim"]  # the loading code installs DDIM
    if sample.negative_prompt:
        flags.append(f"--negative-prompt {sample.negative_prompt!r}")
    flags += [f"--{name} {value}" for name, value in (("height", sample.height), ("width", sample.width)) if value]
    return " ".join(flags)


def _complete_folder_code(pipeline: str, source: str, extra: str) -> list[str]:
    """Loading code for a folder that holds the whole pipeline, with datencoder's DDIM sampler."""
    return [
        "import torch",
        f"from diffusers import DDIMScheduler, {pipeline}",
        f"base = {source!r}",
        f"pipe = {pipeline}.from_pretrained(base{extra})",
        "pipe.scheduler = DDIMScheduler.from_pretrained(base, subfolder='scheduler')  # datencoder's sampler",
    ]


def load_code(base_name: str, sdxl: bool = False) -> list[str]:
    """Python lines (no indent) that leave ``pipe``: the stock pipeline datencoder samples with."""
    root, local, spec = _spec(base_name)
    source = str(Path(root).resolve()) if local else base_name
    if sdxl:  # SDXL folders are complete pipelines (nothing borrowed from a package)
        return _complete_folder_code("StableDiffusionXLPipeline", source, "")
    text_pkg = spec.get("text_encoder", {}).get("python_package")
    tok = spec.get("tokenizer", {})
    if not text_pkg and not tok.get("python_package"):
        return _complete_folder_code("StableDiffusionPipeline", source,
                                     ", safety_checker=None, requires_safety_checker=False")
    # Parts borrowed from a package: assemble the pipeline (from_pretrained needs model_index.json).
    packages = sorted({p for p in (text_pkg, tok.get("python_package")) if p})
    text_src = f"{text_pkg}.get_model_path()" if text_pkg else "base + '/text_encoder'"
    tok_src = f"{tok['python_package']}.get_model_path()" if tok.get("python_package") else "base + '/tokenizer'"
    length = f", model_max_length={int(tok['model_max_length'])}" if "model_max_length" in tok else ""
    if base_name in SHIPPED_BASES:  # inside the installed package: found without importing datencoder
        imports = ["import importlib.util", "import os"]
        where = ["package = importlib.util.find_spec('datencoder').submodule_search_locations[0]",
                 f"base = os.path.join(package, 'assets', {base_name!r})"]
    else:
        imports, where = [], [f"base = {str(Path(root).resolve())!r}"]
    return [
        *imports,
        *(f"import {p}" for p in packages),
        "import torch",
        "from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel",
        "from transformers import AutoModel, AutoTokenizer",
        *where,
        "pipe = StableDiffusionPipeline(",
        "    vae=AutoencoderKL.from_pretrained(base, subfolder='vae', torch_dtype=torch.float32),",
        "    unet=UNet2DConditionModel.from_pretrained(base, subfolder='unet', torch_dtype=torch.float32),",
        f"    text_encoder=AutoModel.from_pretrained(str({text_src})),",
        f"    tokenizer=AutoTokenizer.from_pretrained(str({tok_src}){length}),  # the length datencoder uses",
        "    scheduler=DDIMScheduler.from_pretrained(base, subfolder='scheduler'),  # datencoder's sampler",
        "    safety_checker=None, feature_extractor=None, requires_safety_checker=False)",
    ]


def assembly_readme(base_name: str = DEFAULT_BASE) -> str:
    """README.txt of a folder that borrows parts from a package (the shipped minisd-emoji)."""
    return "\n".join([
        f"Base model {base_name!r} of datencoder: unet/, vae/, scheduler/ (and image_tower/) in diffusers layout.",
        "It is not a complete diffusers pipeline: the text encoder and tokenizer come from a Python package",
        "(see datencoder_base.json), so StableDiffusionPipeline.from_pretrained cannot load this folder.", "",
        "Load it:", "", *(f"    {line}" for line in [*load_code(base_name), *sample_code("a cat")]), "",
        f"This is `datencoder generate \"a cat\" --base {base_name} --num-images 1 --seed 0`. The tokenizer",
        "length and the DDIM settings of scheduler/ matter: left out, every image changes.",
        f"Or write a complete pipeline folder once, `datencoder export-base {base_name} --out DIR`, and load it",
        "with StableDiffusionPipeline.from_pretrained(DIR).", "",
    ])


def _readme(base: BaseModel, folder: Path) -> str:
    return "\n".join([
        f"Base model {base.name!r} exported by datencoder as a diffusers pipeline folder",
        f"(fingerprint {base.fingerprint}; datencoder accepts this folder as --base).", "",
        "Load it:", "",
        "    import torch",
        "    from diffusers import StableDiffusionPipeline",
        f"    pipe = StableDiffusionPipeline.from_pretrained({str(folder)!r})",
        *(f"    {line}" for line in sample_code("a cat")), "",
        "This is `datencoder generate \"a cat\" --base <this folder> --num-images 1 --seed 0` (DDIM, 25 steps).",
        "The scheduler is saved as DDIM with the base's own settings; the tokenizer keeps the length",
        f"datencoder uses ({base.tokenizer.model_max_length}).", "",
    ])


def check_export_dir(out_dir: str | Path, overwrite: bool = True) -> Path:
    """Refuse an ``out_dir`` that holds anything but an earlier exported base (it is replaced whole),
    and that one too unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                        and not (out_dir / "model_index.json").is_file())):
        raise DatencoderError(f"--out {out_dir} exists and is not an exported base; pass a new folder")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DatencoderError(f"--out {out_dir} already holds an exported base; pass --overwrite to replace it "
                              "or choose another --out")
    return out_dir


def pipeline_bytes(base: BaseModel) -> int:
    """Bytes the exported folder takes, about: every weight of every part in fp32, plus the tokenizer."""
    parts = [base.unet, base.vae, base.text_encoder]
    return 4 * sum(p.numel() for part in parts for p in part.parameters()) + 2**24


def export_base(base: BaseModel, out_dir: str | Path, overwrite: bool = True) -> Path:
    """Write ``base`` as a complete ``StableDiffusionPipeline`` folder at ``out_dir`` (replaced whole)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .base import quiet_loading

    out_dir = check_export_dir(out_dir, overwrite)
    root, local = _resolve(base.name)
    tower = Path(root) / "image_tower" if local else None
    # Written beside the target and swapped in, so a reader never sees half a folder.
    with atomic_dir(out_dir) as tmp:
        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        with quiet_loading():
            pipe.save_pretrained(tmp, safe_serialization=True)
        if tower is not None and tower.is_dir():
            shutil.copytree(tower, tmp / "image_tower")
        write_text_atomic(tmp / README_FILE, _readme(base, out_dir.resolve()))
    log.debug("exported base %s to %s", base.name, out_dir)
    return out_dir
