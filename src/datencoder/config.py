"""Typed configuration: dataclasses loaded from YAML, strict about keys, with CLI overrides.

Every dataclass here rejects unknown keys with a one-line ``DatencoderError`` that lists the
valid ones, so a typo in a YAML file or a ``key=value`` override never passes silently.
The resolved config is stored inside every artifact (``to_dict``), and ``from_dict`` reads it
back, so an artifact always says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import DatencoderError

__all__ = [
    "Config",
    "ModelConfig",
    "EncoderConfig",
    "DualPathConfig",
    "LossConfig",
    "DataConfig",
    "TrainConfig",
    "TuneConfig",
    "SampleConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
    "shipped_configs_dir",
    "check_seed",
    "check_range",
    "check_choice",
]

T = TypeVar("T")

SEED_LIMIT = 2**63
"""Seeds are non-negative 63-bit integers: every generator and seed mix of the project takes them."""


def check_seed(seed: int, where: str = "seed") -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise DatencoderError(f"{where} must be an integer in [0, 2**63 - 1], got {seed}")
    return seed


_RULES = {
    "> 0": lambda v: 0 < v < float("inf"),
    ">= 0": lambda v: 0 <= v < float("inf"),
    ">= 1": lambda v: 1 <= v < float("inf"),
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "finite": lambda v: abs(v) < float("inf"),
}
"""Domains used by the configs' ``__post_init__``; written so that NaN and infinity fail every one of them."""


def check_range(config: Any, section: str, rule: str, *names: str) -> None:
    """Refuse, in one line naming ``section.name``, any of the fields ``names`` of ``config`` whose
    value is outside ``rule`` (a key of ``_RULES``); None (an unset optional) passes."""
    ok = _RULES[rule]
    for name in names:
        value = getattr(config, name)
        if value is not None and not ok(value):
            raise DatencoderError(f"{section}.{name} must be {rule}, got {value!r}")


def check_choice(config: Any, section: str, name: str, choices: typing.Iterable[str]) -> None:
    value, choices = getattr(config, name), list(choices)
    if value not in choices:
        raise DatencoderError(f"{section}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class ModelConfig:
    """Which base model and image tower to build on."""

    pretrained: str = "minisd-emoji"
    """Diffusers-layout folder, hub id, or the embedded default ``minisd-emoji``."""
    image_tower: str | None = None
    """transformers vision model (folder or hub id); None uses ``<pretrained>/image_tower``."""
    revision: str | None = None
    variant: str | None = None
    """Weight-file variant to load (``fp16`` reads ``*.fp16.safetensors``); None: the plain weights,
    or the only variant a component folder holds."""
    placeholder: str = "S*"
    """What users write in prompts for the personalised concept."""
    token: str = "<concept>"
    """The token string added to the tokenizer for the placeholder (lowercase-safe)."""

    def __post_init__(self) -> None:
        for name in ("placeholder", "token"):  # pretrained "" means "required on the command line"
            if not getattr(self, name).strip():
                raise DatencoderError(f"model.{name} must not be empty")


@dataclass
class EncoderConfig:
    """The tuning encoder: feature backbone, fusion trunk, embedding head, hypernetwork."""

    tower_layers: list[int] = field(default_factory=lambda: [-1, -3, -5])
    """Hidden-state indices of the image tower that are pooled and concatenated."""
    use_denoiser_features: bool = True
    """E4T-style features of the frozen UNet's down and mid blocks on z_t."""
    neutral_prompt: str = ""
    hidden_dim: int = 512
    trunk_layers: int = 2
    timestep_dim: int = 128
    use_hypernetwork: bool = True
    hypernet_mode: str = "factorized"
    """'factorized': per-sample A and B in learned per-layer subspaces from a small per-sample code
    (A = A_l + P_l(c) V_l, B = U_l Q_l(c)); 'core': a per-sample r x r core on a learned per-layer
    basis (B = U M(x), A fixed); 'full': per-sample A and B from linear heads (hidden x r x
    sum(in + out) weights: refused at scale by max_head_fraction). See hypernetwork.py."""
    basis_dim: int = 16
    """'factorized': width k of each layer's bases V_l [k, in] and U_l [out, k]."""
    code_dim: int = 128
    """'factorized': width d of the per-sample code the per-layer maps read."""
    max_head_fraction: float | None = 0.05
    """Refuse, before allocating it, a hypernetwork with more weights than this fraction of the
    UNet's parameters (but always allow 16 M: small bases); null: no limit."""
    rank: int = 4
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Attention projections that receive low-rank offsets."""
    attention_kinds: list[str] = field(default_factory=lambda: ["self", "cross"])
    lora_scale: float = 1.0
    inference_timestep: int | None = None
    """Timestep of the denoiser features when predicting for a new image; None = T // 2."""

    def __post_init__(self) -> None:
        check_range(self, "encoder", ">= 1", "trunk_layers", "rank", "hidden_dim", "timestep_dim", "basis_dim",
                    "code_dim")
        check_range(self, "encoder", "> 0", "max_head_fraction")
        check_range(self, "encoder", ">= 0", "inference_timestep")
        check_range(self, "encoder", "finite", "lora_scale")
        if not self.targets or not self.attention_kinds:
            raise DatencoderError("encoder.targets and encoder.attention_kinds must not be empty")
        check_choice(self, "encoder", "hypernet_mode", ("factorized", "core", "full"))
        bad = [k for k in self.attention_kinds if k not in ("self", "cross")]
        if bad:
            raise DatencoderError(f"encoder.attention_kinds may hold 'self' and 'cross', got {bad}")
        bad = [t for t in self.targets if t not in ("to_q", "to_k", "to_v", "to_out.0")]
        if bad:
            raise DatencoderError(f"encoder.targets may hold to_q, to_k, to_v, to_out.0, got {bad}")


POOLED_CHOICES = ("soft", "hard", "blend")
"""Where SDXL's pooled text (the time embedding) comes from under the dual path (``dual_path.pooled``)."""


@dataclass
class DualPathConfig:
    """out = a * Attn(W + dW, soft prompt) + (1 - a) * Attn(W, hard prompt)."""

    enabled: bool = True
    blend_self: float = 0.5
    blend_cross: float = 0.5
    in_pretraining: bool = False
    pooled: str = "hard"
    """SDXL only: the pooled text vector of the time embedding, which both paths and every resnet
    share. 'hard': the hard prompt's (a = 0 is then exactly the base on the hard prompt: the
    vanilla path keeps the prior); 'soft': the soft prompt's (it carries v); 'blend':
    blend_cross * soft + (1 - blend_cross) * hard. Without the dual path it is the soft prompt's."""

    def __post_init__(self) -> None:
        check_choice(self, "dual_path", "pooled", POOLED_CHOICES)
        for name in ("blend_self", "blend_cross"):
            a = getattr(self, name)
            if not 0.0 <= a <= 1.0:
                raise DatencoderError(f"dual_path.{name} must lie in [0, 1], got {a}")


@dataclass
class LossConfig:
    """Weights of the named loss terms; a weight of 0 switches a term off."""

    contrastive_weight: float = 0.01
    tau: float = 0.07
    num_negatives: int = 256
    top_k_positives: int = 1
    predicted_negatives: bool = False
    """Contrastive term: the batch's other predicted embeddings are negatives too, which keeps
    different concepts apart (without it several concepts may share one nearest word for free)."""
    distinct_positives: bool = False
    """Contrastive term: different concepts in a batch are pulled toward different words (each the
    nearest word no other concept in the batch has taken), not all onto one shared word."""
    whole_words_only: bool = True
    norm_weight: float = 0.001
    l2_weight: float = 0.0
    """E4T-style L2 pull of the embedding toward its initial word (baseline)."""
    l2_anchor: str | None = None
    lora_weight: float = 0.0
    """L2 penalty on the predicted offsets."""
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        check_range(self, "loss", ">= 0", "contrastive_weight", "norm_weight", "l2_weight", "lora_weight",
                    "num_negatives")
        check_range(self, "loss", "> 0", "tau", "snr_gamma")
        check_range(self, "loss", ">= 1", "top_k_positives")


@dataclass
class DataConfig:
    root: str = ""
    resolution: int = 0
    """0 uses the VAE's sample size (pixels)."""
    templates: list[str] = field(
        default_factory=lambda: [
            "a photo of S*",
            "a rendering of S*",
            "S*",
            "a picture of S*",
            "an image of S*",
        ]
    )
    hflip: bool = True
    scale_min: float = 0.8
    extensions: list[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".webp", ".bmp"])
    manifest: str | None = None
    """Optional JSONL manifest (emoji data set): only rows whose split is in ``splits`` are used."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    categories: list[str] | None = None
    """With a manifest: keep only rows whose ``category`` is listed (E4T-style single-domain baseline)."""
    use_source: bool = False
    """With a manifest: train on each row's clean ``source`` render instead of its composed ``file``."""
    pair_by: str | None = None
    """With a manifest: a row field (``concept``) that makes each item a pair. The encoder sees one
    row's image and the loss reconstructs another row with the same value of this field (another
    render of the same thing), under the templates filled with that target row's fields; so S* can
    only carry what the two renders share, and what the target's prompt names (its background,
    layout, style) comes from the text."""
    pair_input: str = "file"
    """With ``pair_by``: the encoder's image is the input row's composed ``file`` (the partner is a
    different row) or its clean ``source`` render (any row of the group, its own included)."""
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_range(self, "data", ">= 0", "resolution", "num_workers")
        check_range(self, "data", "in (0, 1]", "scale_min")
        if not self.templates:
            raise DatencoderError("data.templates must hold at least one prompt template")
        if not self.splits:
            raise DatencoderError("data.splits must name at least one split")
        if self.pair_input not in ("file", "source"):
            raise DatencoderError(f"data.pair_input must be 'file' or 'source', got {self.pair_input!r}")
        if self.pair_by is not None:
            if not self.pair_by:
                raise DatencoderError("data.pair_by is empty; name a manifest field (concept) or set it to null")
            if not self.manifest:
                raise DatencoderError("data.pair_by needs data.manifest=FILE.jsonl (a plain folder has no fields "
                                      "to pair its images by)")
            if self.use_source:
                raise DatencoderError("data.pair_by pairs composed rows; set data.use_source=false "
                                      "(data.pair_input=source gives the encoder the clean render)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    """After the linear warm-up: 'constant' or 'cosine' (decays to 0 at ``steps``)."""
    weight_decay: float = 0.0
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (accelerate autocast; the encoder's weights and AdamW state stay fp32)."""
    base_dtype: str = "fp32"
    """Precision of the frozen base (VAE, UNet, text encoder, image tower): 'fp32', 'bf16' or 'fp16'."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (less memory, about a third more time)."""
    checkpoint_every: int = 200
    checkpoint_minutes: float = 0.0
    """Also checkpoint every this many minutes (0: by step count only)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much training time, summed over resumes; 0: no limit."""
    sample_every: int = 0
    """Steps between sample grids (0: never): encoder-only concepts of fixed training images."""
    sample_concepts: int = 2
    """Training images (evenly spaced in the data set) personalised in each sample grid."""
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of S*", "S* on the beach"])
    log_every: int = 10
    seed: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.base_dtype not in ("fp32", "bf16", "fp16"):
            raise DatencoderError(f"train.base_dtype must be 'fp32', 'bf16' or 'fp16', got {self.base_dtype!r}")
        check_seed(self.seed, "train.seed")
        if self.base_dtype == "fp16" and self.mixed_precision != "fp16":
            raise DatencoderError("train.base_dtype=fp16 needs train.mixed_precision=fp16 (its loss scaling keeps the "
                                  "gradients from underflowing); or use train.base_dtype=bf16")
        for key in ("steps", "checkpoint_every", "sample_concepts"):
            if getattr(self, key) < 1:
                raise DatencoderError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        self.loop()  # validates the loop's values

    def loop(self, num_workers: int = 0):
        """The training loop's settings (``datencoder.training``)."""
        from .training import LoopConfig

        return LoopConfig.taken_from(self, work_dir=self.output_dir, num_workers=num_workers)


TUNE_STEPS_MAX = 1000
"""The most tuning steps a personalisation takes (TuneConfig.steps); pre-training is not limited."""


@dataclass
class TuneConfig:
    steps: int = 12
    batch_size: int = 4
    lr_embedding: float = 3e-3
    lr_lora: float = 1e-3
    tune_embedding: bool = True
    tune_lora: bool = True
    tune_heads: bool = False
    """Tune copies of the encoder's embedding head and of the hypernetwork's per-sample maps
    (hypernetwork.TUNED_BY_HEADS) on the image's fixed trunk features instead of v and the factors
    directly (METHOD.md: "optionally also the encoder's heads"); tune_embedding / tune_lora then
    pick the embedding head / the hypernetwork."""
    lr_heads: float = 1e-4
    seed: int = 0
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (less memory at larger batches)."""
    templates: list[str] | None = None
    """Prompt templates of the tuning steps; None: data.templates (which must then name no manifest
    fields: a user's one image has no manifest row)."""

    def __post_init__(self) -> None:
        if self.templates is not None and not self.templates:
            raise DatencoderError("tune.templates is empty; give prompt templates with S* or leave it unset")
        check_range(self, "tune", ">= 0", "steps")
        if self.steps > TUNE_STEPS_MAX:
            raise DatencoderError(f"tune.steps must be at most {TUNE_STEPS_MAX} (personalisation tunes a few steps, "
                                  f"the paper 15; each takes about a second on a CPU), got {self.steps}")
        check_range(self, "tune", ">= 1", "batch_size")
        check_range(self, "tune", "> 0", "lr_embedding", "lr_lora", "lr_heads")
        check_seed(self.seed, "tune.seed")


SCHEDULER_NAMES = ("ddim", "dpm", "euler")
"""Samplers ``generate`` offers (``pipeline.SCHEDULERS`` maps them to diffusers classes)."""


@dataclass
class SampleConfig:
    """Generation defaults; ``datencoder generate`` takes them from the concept's config, and its
    flags override them."""

    steps: int = 25
    guidance: float = 7.5
    num_images: int = 4
    seed: int = 0
    scheduler: str = "ddim"
    negative_prompt: str = ""
    height: int | None = None
    """Image size in pixels; None: the base's resolution."""
    width: int | None = None

    def __post_init__(self) -> None:
        check_range(self, "sample", ">= 1", "steps", "num_images", "height", "width")
        check_range(self, "sample", "finite", "guidance")
        check_choice(self, "sample", "scheduler", SCHEDULER_NAMES)
        check_seed(self.seed, "sample.seed")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dual_path: DualPathConfig = field(default_factory=DualPathConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# --------------------------------------------------------------------------------------------
# Generic (de)serialisation, usable with any config dataclass of the project.


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (a small subset of typing)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise DatencoderError(f"config section '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, _prefix=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except DatencoderError as err:
                errors.append(str(err))
        raise DatencoderError(errors[0] if errors else f"config key '{where}': bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise DatencoderError(f"config key '{where}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise DatencoderError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DatencoderError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DatencoderError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan in YAML: no setting means that
                raise DatencoderError(f"config key '{where}' must be a finite number, got {value!r}")
            return float(value)
        raise DatencoderError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DatencoderError(f"config key '{where}' must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, _prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) mapping, rejecting unknown keys."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{_prefix}.{unknown[0]}" if _prefix else unknown[0]
        raise DatencoderError(
            f"unknown config key '{key}' (valid keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        where = f"{_prefix}.{name}" if _prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON/YAML-serialisable data."""
    return dataclasses.asdict(config)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars.

    PyYAML implements YAML 1.1, where ``3e-3`` (no dot) is a string and ``no``/``off``/``y`` are
    booleans; ``tune.lr_lora=3e-3`` would then be refused and ``train.mixed_precision=no`` would
    become False. YAML 1.2 reads numbers as numbers and only ``true``/``false`` as booleans.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Yaml12Loader.add_constructor(  # base 10 (YAML 1.1 reads a leading 0 as octal) or 0x hex
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 0 if "x" in node.value else 10))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text as data, with YAML 1.2 numbers and booleans (``_Yaml12Loader``)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML 1.2) to a nested mapping."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise DatencoderError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise DatencoderError(f"override {item!r}: the value is not valid YAML ({problem}); "
                                  "quote lists on the shell, e.g. 'encoder.tower_layers=[-1, -2]'") from None
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise DatencoderError(f"override {item!r}: empty key part; write section.key=value")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def shipped_configs_dir() -> Path:
    """Where the configs shipped with the package live."""
    return Path(__file__).parent / "configs"


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type[T] = Config) -> T:
    """Load a YAML config into ``cls`` (default: the method's ``Config``), with overrides.

    ``path`` is a file, or the name of a shipped config (``tiny`` -> ``configs/tiny.yaml``).
    """
    p = Path(path)
    if not p.exists():
        shipped = shipped_configs_dir() / (p.name if p.suffix else f"{p.name}.yaml")
        if shipped.exists():
            p = shipped
        else:
            raise DatencoderError(f"config file not found: {path} (give a YAML path or a shipped name)")
    try:
        data = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise DatencoderError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise DatencoderError(f"config file {p} must hold a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)
