"""The evaluation's configuration: methods, target groups, targets and the whole run.

Every value with a domain is checked in ``__post_init__`` (one-line ``DatencoderError``), so a bad
config fails when it is loaded, before any model is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import check_seed
from ..errors import DatencoderError

__all__ = ["MethodConfig", "TargetGroup", "TargetsConfig", "EvalConfig", "KINDS", "SCORERS", "SCHEDULERS"]

KINDS = ("ours", "textual_inversion", "dreambooth_lora", "dreambooth")
SCORERS = ("emoji", "clip", "dino")
SCHEDULERS = ("ddim", "dpm", "euler")
"""The samplers of ``pipeline.SCHEDULERS`` (named here so a config loads without diffusers)."""


@dataclass
class MethodConfig:
    name: str = ""
    kind: str = "ours"
    """ours | textual_inversion | dreambooth_lora | dreambooth (the whole UNet trainable)."""
    encoder: str | None = None
    """ours: folder of a pre-trained encoder (``<pretrain output_dir>/encoder``)."""
    steps: int = 12
    """Tuning / optimisation steps."""
    overrides: dict = field(default_factory=dict)
    """ours: {section: {key: value}} over the encoder's config (e.g. {dual_path: {enabled: false}});
    baselines: {key: value} of TextualInversionConfig / DreamBoothLoRAConfig / DreamBoothConfig
    (e.g. {lr: 1e-3})."""
    categories: list[str] | None = None
    """Only targets of these categories (E4T inside its domain); None = all."""
    exclude_categories: list[str] = field(default_factory=list)
    groups: list[str] | None = None
    """Only targets of these target groups (the long baselines on the paper's setting); None = all."""
    per_category: int | None = None
    """Only the first N targets of each group's category (a subset for costly methods, e.g. the long
    baselines on 12 of 36 targets; the same subset in every shard); None = all."""

    def __post_init__(self) -> None:
        if not self.name:
            raise DatencoderError("every evaluation method needs a name")
        if self.kind not in KINDS:
            raise DatencoderError(f"method {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "ours" and not self.encoder:
            raise DatencoderError(f"method {self.name}: kind 'ours' needs encoder: FOLDER")
        if self.per_category is not None and self.per_category < 1:
            raise DatencoderError(f"method {self.name}: per_category must be >= 1, got {self.per_category}")
        if self.steps < 0:
            raise DatencoderError(f"method {self.name}: steps must be >= 0, got {self.steps}")
        if not isinstance(self.overrides, dict):
            raise DatencoderError(f"method {self.name}: overrides must be a mapping, got {self.overrides!r}")


@dataclass
class TargetGroup:
    name: str = "heldout"
    split: str = "heldout_concept"
    style: str = "fluent3d"
    per_category: int = 2
    categories: list[str] | None = None
    splits: list[str] | None = None
    """Rows of any of these splits (replaces ``split``): a world's concepts in the unseen style are
    ``heldout_style`` rows, the demo's among them ``heldout_concept`` rows."""
    world: str | None = None
    """A world file (``datencoder data world``): only its concepts, or with ``outside_world`` only the others."""
    outside_world: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise DatencoderError("every target group needs a name")
        if self.splits is not None and not self.splits:
            raise DatencoderError(f"target group {self.name}: splits is empty; name at least one split or drop it")
        if self.outside_world and not self.world:
            raise DatencoderError(f"target group {self.name}: outside_world needs world: FILE")
        if self.per_category < 1:
            raise DatencoderError(f"target group {self.name}: per_category must be >= 1, got {self.per_category}")


@dataclass
class TargetsConfig:
    manifest: str | None = None
    groups: list[TargetGroup] = field(default_factory=list)
    use_source: bool = True
    """Personalise from the clean render (sources/...) rather than a composed training image."""
    images: list[str] = field(default_factory=list)
    """Explicit target images (concept, name, category read from the manifest when listed there)."""
    seed: int = 0
    """Seed of the per-category choice of concepts."""
    folder: str | None = None
    """A folder of the user's own target images (also one level of subfolders), no manifest needed."""
    class_words: str | None = None
    """With ``folder``: a JSON {file: class word} or CSV (file,class) naming each image's class (CLIP-T
    replaces S* by it). Without it the class is the subfolder's name, else the file name without
    trailing digits (``red_dog_02.png`` -> "red dog")."""

    def __post_init__(self) -> None:
        check_seed(self.seed, "targets.seed")
        if self.groups and not self.manifest:
            raise DatencoderError("targets.groups need targets.manifest (the emoji manifest.jsonl)")
        if self.class_words and not self.folder:
            raise DatencoderError("targets.class_words names the classes of targets.folder; set targets.folder too")


@dataclass
class EvalConfig:
    base: str = "minisd-emoji"
    image_tower: str | None = None
    methods: list[MethodConfig] = field(default_factory=list)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    prompts: list[str] = field(default_factory=lambda: ["S*", "S*, on a blue background"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    sample_steps: int = 20
    guidance: float = 4.0
    scheduler: str = "ddim"
    evaluator: str | None = None
    """Evaluator folder or shipped name (``evaluator_world``); None = the shipped one (assets/evaluator)."""
    among: str | None = None
    """A world file: concept top-1 / top-5 rank the target among its concepts only (the evaluator's
    other classes ignored), as the world's quality benchmark does; None = among all its classes."""
    scorers: list[str] = field(default_factory=lambda: ["emoji"])
    """emoji (the evaluator: identity, concept, attributes) and/or the paper's metrics: clip (CLIP-I,
    CLIP-T; needs clip_model) and dino (DINO; needs dino_model)."""
    clip_model: str | None = None
    """transformers CLIPModel folder or hub id (e.g. openai/clip-vit-large-patch14)."""
    dino_model: str | None = None
    """transformers Dinov2Model folder or hub id (e.g. facebook/dinov2-small)."""
    output_dir: str = "runs/eval"
    save_images: bool = True
    grids: int = 2
    """Example grids (rows = methods, columns = prompts) for the first N targets."""
    paired_with: str | None = None
    """A method (e.g. the no-personalisation floor) every other method is compared with per target."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise DatencoderError(f"method names must be unique, got {names}")
        if self.paired_with is not None and self.paired_with not in names:
            raise DatencoderError(f"paired_with {self.paired_with!r} is not one of the methods {names}")
        for p in self.prompts:
            if "S*" not in p:
                raise DatencoderError(f"evaluation prompt {p!r} has no placeholder S*")
        if not self.seeds or not self.prompts:
            raise DatencoderError("evaluation needs at least one prompt and one seed")
        for seed in self.seeds:
            check_seed(seed, "every evaluation seed")
        if self.sample_steps < 1:
            raise DatencoderError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if not math.isfinite(self.guidance):
            raise DatencoderError(f"guidance must be a finite number, got {self.guidance}")
        if self.scheduler not in SCHEDULERS:
            raise DatencoderError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.grids < 0:
            raise DatencoderError(f"grids must be >= 0, got {self.grids}")
        if not self.output_dir:
            raise DatencoderError("output_dir must name a folder")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise DatencoderError(f"scorers must be a non-empty list of {', '.join(SCORERS)}, got {self.scorers}")
        for scorer, key in (("clip", "clip_model"), ("dino", "dino_model")):
            if scorer in self.scorers and not getattr(self, key):
                raise DatencoderError(f"scorer {scorer!r} needs {key}: a folder or hub id")
