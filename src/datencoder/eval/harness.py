"""Evaluation harness: every method personalises the same targets and is measured identically.

METHOD.md, "Metrics": for each method and target image the harness personalises (timed, with
peak memory), generates every prompt x seed through ``ConceptPipeline``, and scores each image
with the emoji ``Evaluator`` (the default scorer):

- identity: cosine of the evaluator's identity embeddings of the generated and the input image;
- concept top-1 / top-5: whether the target concept is among the evaluator's top concepts;
- style: whether the predicted rendering style is the target's (fluent3d for the emoji targets);
- editability: accuracy of the background / position / size the prompt states (only those).

With ``scorers: [clip, dino]`` (any supported base, e.g. on a folder of the user's own images:
``targets.folder``) the paper's metrics are recorded instead or as well (``paper_metrics``):
CLIP-I and DINO (identity), CLIP-T with S* replaced by the target's class word (editability).

Per-image records go to one file per (method, target) pair, ``records/<method>/<target>.jsonl``,
written atomically when the pair is complete (a rerun skips finished pairs, and processes running
other methods or other target shards never touch the same file); ``evaluation_report`` turns them
into tables and plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import write_json_atomic, write_text_atomic
from ..config import from_dict, to_dict
from ..errors import DatencoderError

__all__ = ["MethodConfig", "TargetGroup", "TargetsConfig", "EvalConfig", "Target", "select_targets",
           "parse_prompt", "personalize_with", "score_images", "score_all", "run_evaluation", "read_records", "pair_file",
           "records_file", "parse_shard",
           "reset_peak_memory", "method_targets", "folder_targets", "KINDS", "SCORERS"]

log = logging.getLogger(__name__)

KINDS = ("ours", "textual_inversion", "dreambooth_lora")
SCORERS = ("emoji", "clip", "dino")


@dataclass
class MethodConfig:
    name: str = ""
    kind: str = "ours"
    """ours | textual_inversion | dreambooth_lora."""
    encoder: str | None = None
    """ours: folder of a pre-trained encoder (``<pretrain output_dir>/encoder``)."""
    steps: int = 12
    """Tuning / optimisation steps."""
    overrides: dict = field(default_factory=dict)
    """ours: {section: {key: value}} over the encoder's config (e.g. {dual_path: {enabled: false}});
    baselines: {key: value} of TextualInversionConfig / DreamBoothLoRAConfig (e.g. {lr: 1e-3})."""
    categories: list[str] | None = None
    """Only targets of these categories (E4T inside its domain); None = all."""
    exclude_categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise DatencoderError("every evaluation method needs a name")
        if self.kind not in KINDS:
            raise DatencoderError(f"method {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "ours" and not self.encoder:
            raise DatencoderError(f"method {self.name}: kind 'ours' needs encoder: FOLDER")
        if self.steps < 0:
            raise DatencoderError(f"method {self.name}: steps must be >= 0, got {self.steps}")


@dataclass
class TargetGroup:
    name: str = "heldout"
    split: str = "heldout_concept"
    style: str = "fluent3d"
    per_category: int = 2
    categories: list[str] | None = None


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
    """Evaluator folder; None = the shipped one (assets/evaluator)."""
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
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise DatencoderError(f"scorers must be a non-empty list of {', '.join(SCORERS)}, got {self.scorers}")
        for scorer, key in (("clip", "clip_model"), ("dino", "dino_model")):
            if scorer in self.scorers and not getattr(self, key):
                raise DatencoderError(f"scorer {scorer!r} needs {key}: a folder or hub id")


@dataclass
class Target:
    image: str
    concept: str
    name: str
    """The concept's name or class word: CLIP-T replaces S* with it ("grinning face", "dog")."""
    category: str
    style: str
    group: str


# -- targets ----------------------------------------------------------------------------------


def _manifest_rows(manifest: str | Path) -> list[dict]:
    path = Path(manifest)
    if not path.is_file():
        raise DatencoderError(f"target manifest {path} not found; set targets.manifest to the emoji manifest.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_class_words(path: str | Path) -> dict[str, str]:
    """{file (as written, relative to the folder): class word} from a JSON mapping or a file,class CSV."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DatencoderError(f"targets.class_words file {path} not found")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            return {str(k): str(v) for k, v in data.items()}
        rows = list(csv.reader(path.read_text().splitlines()))
    except ValueError as err:
        raise DatencoderError(f"{path} must hold a JSON object {{file: class word}} ({err})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "class"]:
        rows = rows[1:]
    bad = [r for r in rows if r and len(r) < 2]
    if bad:
        raise DatencoderError(f"{path}: every CSV row needs file,class; got {bad[0]}")
    return {r[0].strip(): r[1].strip() for r in rows if r}


def _class_from_name(relative: Path) -> str:
    if len(relative.parts) > 1:  # DreamBench layout: <class or subject>/<n>.jpg
        return relative.parts[0].replace("_", " ").replace("-", " ").strip()
    return re.sub(r"[\s_-]*\d+$", "", relative.stem).replace("_", " ").replace("-", " ").strip() or relative.stem


def folder_targets(folder: str | Path, class_words: str | Path | None = None) -> list[Target]:
    """The images of a folder (and its direct subfolders) as targets, each with its class word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatencoderError(f"targets.folder {folder} is not a folder of images")
    files = sorted(p for p in [*folder.glob("*"), *folder.glob("*/*")]
                   if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DatencoderError(f"targets.folder {folder} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    words = _read_class_words(class_words) if class_words else None
    targets = []
    for path in files:
        relative = path.relative_to(folder)
        if words is None:
            word = _class_from_name(relative)
        else:
            word = words.get(relative.as_posix(), words.get(path.name))
            if not word:
                raise DatencoderError(f"{class_words} names no class word for {relative.as_posix()}")
        concept = relative.with_suffix("").as_posix()
        targets.append(Target(str(path), concept, word, word, "unknown", "folder"))
    return targets


def select_targets(cfg: TargetsConfig, shard: tuple[int, int] | None = None) -> list[Target]:
    """Targets of each group (N concepts per category, picked by a seeded hash) plus explicit images.

    ``shard=(k, n)``: only the targets whose index modulo n is k.
    """
    targets: list[Target] = []
    rows = _manifest_rows(cfg.manifest) if cfg.manifest else []
    root = Path(cfg.manifest).parent if cfg.manifest else Path(".")
    key = "source" if cfg.use_source else "file"
    for group in cfg.groups:
        by_category: dict[str, dict[str, dict]] = {}
        for row in rows:
            if row.get("split") == group.split and row.get("style") == group.style and (
                    group.categories is None or row.get("category") in group.categories):
                by_category.setdefault(row["category"], {}).setdefault(row["concept"], row)
        for category in sorted(by_category):
            concepts = sorted(by_category[category], key=lambda c: hashlib.sha256(
                f"{cfg.seed}:{c}".encode()).hexdigest())
            for concept in concepts[: group.per_category]:
                row = by_category[category][concept]
                targets.append(Target(str(root / row[key]), concept, row["name"], category, row["style"], group.name))
    known = {str(root / r[k]): r for r in rows for k in ("file", "source")}
    for image in cfg.images:
        row = known.get(str(image)) or known.get(str(root / image))
        if row is None:
            stem = Path(image).stem
            targets.append(Target(str(image), stem, stem, "unknown", "unknown", "images"))
        else:
            targets.append(Target(str(image), row["concept"], row["name"], row["category"], row["style"], "images"))
    if cfg.folder:
        targets.extend(folder_targets(cfg.folder, cfg.class_words))
    seen, unique = set(), []
    for t in targets:  # a concept image chosen by two groups is evaluated once
        if t.image not in seen:
            seen.add(t.image)
            unique.append(t)
    if not unique:
        raise DatencoderError("no evaluation targets: set targets.groups (with targets.manifest), targets.images "
                              "or targets.folder")
    if shard is not None:
        unique = [t for i, t in enumerate(unique) if i % shard[1] == shard[0]]
    return unique


def method_targets(method: MethodConfig, targets: list[Target]) -> list[Target]:
    return [t for t in targets if (method.categories is None or t.category in method.categories)
            and t.category not in method.exclude_categories]


# -- prompts ----------------------------------------------------------------------------------

_BACKGROUND = re.compile(r"\bon an? ([a-z]+) background\b")


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt states, in the caption vocabulary of the emoji data set.

    "S*, small, top left, on a blue background" -> {size: small, position: top left, background: blue}.
    """
    from ..emoji.data import BACKGROUNDS, POSITIONS, SIZES

    found: dict[str, str] = {}
    for part in (p.strip().lower() for p in prompt.split(",")):
        match = _BACKGROUND.search(part)
        if match and match.group(1) in BACKGROUNDS:
            found["background"] = match.group(1)
        elif part in SIZES:
            found["size"] = part
        elif part in POSITIONS:
            found["position"] = part
    return found


# -- personalisation ----------------------------------------------------------------------------


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak: CUDA allocator stats, or the kernel's RSS high-water mark on Linux."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets VmHWM, which getrusage's ru_maxrss reports for this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.debug("cannot reset the peak RSS: peak memory is the process maximum so far")


def personalize_with(method: MethodConfig, base, pixels: torch.Tensor, system_cache: dict, info: dict,
                     run=None):
    """One method's concept for one image ([3, H, W] in [-1, 1]).

    ``run``: a baseline's ``OptimisationRun`` to continue (same settings, fewer steps), or None.
    """
    from .baselines import DreamBoothLoRAConfig, TextualInversionConfig, dreambooth_lora, textual_inversion

    if method.kind == "textual_inversion":
        return textual_inversion(base, pixels, from_dict(TextualInversionConfig, {**method.overrides,
                                                                                  "steps": method.steps}),
                                 info=info, run=run)
    if method.kind == "dreambooth_lora":
        return dreambooth_lora(base, pixels, from_dict(DreamBoothLoRAConfig, {**method.overrides,
                                                                              "steps": method.steps}),
                               info=info, run=run)
    from ..system import EncoderSystem
    from ..tuning import personalize

    if method.name not in system_cache:
        overrides = {s: dict(v) for s, v in method.overrides.items()}
        overrides.setdefault("tune", {})["steps"] = method.steps
        system_cache[method.name] = EncoderSystem.load(method.encoder, base, overrides)
    return personalize(system_cache[method.name], pixels, info=info)


# -- scoring ----------------------------------------------------------------------------------


@torch.no_grad()
def score_images(evaluator, images, reference, target: Target, prompts: list[str]) -> list[dict]:
    """Scores of generated ``images`` (one per prompt) against the input image ``reference``."""
    logits, emb = evaluator.logits(list(images) + [reference])
    gen_emb, ref_emb = emb[:-1], emb[-1:]
    identity = (gen_emb @ ref_emb.T)[:, 0].tolist()  # both L2-normalised
    concept_index = evaluator.index["concept"].get(target.concept)
    top5 = logits["concept"][:-1].topk(min(5, logits["concept"].shape[1]), dim=-1).indices.tolist()
    predicted = {h: [evaluator.labels[h][i] for i in logits[h][:-1].argmax(-1).tolist()]
                 for h in ("style", "background", "position", "size")}
    out = []
    for i, prompt in enumerate(prompts):
        expected = parse_prompt(prompt)
        rec = {"identity": round(identity[i], 5),
               "top1": None if concept_index is None else int(top5[i][0] == concept_index),
               "top5": None if concept_index is None else int(concept_index in top5[i]),
               "style": predicted["style"][i], "style_ok": int(predicted["style"][i] == target.style),
               "expected": expected, "predicted": {h: predicted[h][i] for h in ("background", "position", "size")}}
        for attr in ("background", "position", "size"):
            rec[f"{attr}_ok"] = int(predicted[attr][i] == expected[attr]) if attr in expected else None
        out.append(rec)
    return out


def score_all(scorers: dict, images, reference, target: Target, prompts: list[str]) -> list[dict]:
    """Every configured scorer's scores of each generated image, merged per image.

    ``scorers``: {"emoji": Evaluator, "paper": PaperMetrics} (either may be absent).
    """
    out: list[dict] = [{} for _ in prompts]
    if "emoji" in scorers:
        for rec, scores in zip(out, score_images(scorers["emoji"], images, reference, target, prompts)):
            rec.update(scores)
    if "paper" in scorers:
        for rec, scores in zip(out, scorers["paper"].score(list(images), reference, prompts, target.name)):
            rec.update(scores)
    return out


def _load_scorers(cfg: EvalConfig) -> dict:
    scorers: dict = {}
    if "emoji" in cfg.scorers:
        from ..emoji.evaluator import load_evaluator

        scorers["emoji"] = load_evaluator(cfg.evaluator)
    if "clip" in cfg.scorers or "dino" in cfg.scorers:
        from .paper_metrics import PaperMetrics

        scorers["paper"] = PaperMetrics(cfg.clip_model if "clip" in cfg.scorers else None,
                                        cfg.dino_model if "dino" in cfg.scorers else None)
    return scorers


# -- the loop ---------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """Records of one JSONL file, or of every records file of an evaluation folder.

    An evaluation folder holds ``records/<method>/<target>.jsonl`` (one per pair, written by the
    harness) and ``records/<name>.jsonl`` (one per method: reference rows, earlier versions).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "records").glob("*.jsonl")) + sorted((path / "records").glob("*/*.jsonl"))
        return [r for f in files for r in read_records(f)]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_file(output_dir: str | Path, method: str) -> Path:
    """A whole method's records in one file (reference rows: ``benchmarks/eval_reference.py``)."""
    return Path(output_dir) / "records" / f"{method}.jsonl"


def pair_file(output_dir: str | Path, method: str, target: str) -> Path:
    """The records of one (method, target image) pair."""
    tag = hashlib.sha1(target.encode()).hexdigest()[:8]
    return Path(output_dir) / "records" / method / f"{Path(target).stem}-{tag}.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): the targets with index % N == K (0 <= K < N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise DatencoderError(f"shard must be K/N with 0 <= K < N (e.g. 0/2 and 1/2), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _write_records(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


PairCallback = Callable[[str, str, bool], None]


def run_evaluation(cfg: EvalConfig, methods: list[str] | None = None,
                   on_pair: PairCallback | None = None, shard: tuple[int, int] | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Run every (method, target) pair not yet recorded; return {records, ran, skipped, targets}.

    The base model runs on ``device`` with frozen weights in ``dtype``; the scorers stay on the CPU.

    Records go to one file per pair (``pair_file``; ``read_records(output_dir)`` reads them all),
    so several processes may share one folder when they run different ``methods`` or different
    target shards: ``shard=(k, n)`` takes the targets whose index modulo n is k. Baselines that
    differ only in their step count (ti-100, ti-500, ti-2000) continue one optimisation per target
    when they run in one process, in the config's order: each result equals a straight run of its
    length, and its reported seconds are those of the whole run.
    ``on_pair(method, target, ran)`` reports progress.
    """
    from ..base import load_base
    from ..image_io import image_to_tensor, load_image, save_image_atomic
    from ..pipeline import ConceptPipeline

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"prompts": cfg.prompts, "seeds": cfg.seeds, "sample_steps": cfg.sample_steps,
             "guidance": cfg.guidance, "scheduler": cfg.scheduler, "base": cfg.base}
    if cfg.scorers != ["emoji"]:  # only then: folders made before the option existed stay valid
        setup["scorers"] = sorted(cfg.scorers)
    setup_file = out / "eval_setup.json"
    if setup_file.is_file() and json.loads(setup_file.read_text()) != setup:
        raise DatencoderError(f"{out} holds records made with other prompts, seeds, sampling or base; "
                              "set output_dir to a new folder")
    write_json_atomic(setup_file, setup)
    write_json_atomic(out / "eval_config.json", to_dict(cfg))

    chosen = [m for m in cfg.methods if methods is None or m.name in methods]
    unknown = sorted(set(methods or []) - {m.name for m in cfg.methods})
    if unknown:
        raise DatencoderError(f"unknown method(s) {unknown}; the config has {[m.name for m in cfg.methods]}")
    from ..system import encoder_path

    missing = [f"{m.name} ({m.encoder})" for m in chosen
               if m.kind == "ours" and not (encoder_path(m.encoder) / "encoder.json").is_file()]
    if missing:  # fail before hours of baselines, not when the first encoder method comes up
        raise DatencoderError(f"no pre-trained encoder for {', '.join(missing)}; pre-train them "
                              "(docs/evaluation.md) or leave them out with --methods")
    targets = select_targets(cfg.targets, shard)
    per_pair = len(cfg.prompts) * len(cfg.seeds)
    names = {m.name for m in chosen}
    existing = [r for r in read_records(out) if r["method"] in names]
    counts: dict[tuple[str, str], int] = {}
    for r in existing:
        counts[(r["method"], r["target"])] = counts.get((r["method"], r["target"]), 0) + 1
    done = {pair for pair, n in counts.items() if n == per_pair}
    existing = [r for r in existing if (r["method"], r["target"]) in done]
    for m in chosen:  # a whole-method file (earlier layout) loses its partial pairs, if it has any
        legacy = read_records(records_file(out, m.name))
        kept = [r for r in legacy if (r["method"], r["target"]) in done]
        if len(kept) != len(legacy):
            _write_records(records_file(out, m.name), kept)

    pending = [(m, t) for m in chosen for t in method_targets(m, targets) if (m.name, t.image) not in done]
    # models are loaded only when there is work: a finished evaluation re-renders its reports in seconds
    base = load_base(cfg.base, cfg.image_tower, torch_dtype=dtype, device=device) if pending else None
    scorers = _load_scorers(cfg) if pending else {}
    systems: dict = {}
    runs: dict = {}  # (kind, settings, target) -> OptimisationRun, for baselines that grow in steps
    ran, skipped = [], []
    new: list[dict] = []
    for method in chosen:
        for target in method_targets(method, targets):
            if (method.name, target.image) in done:
                skipped.append((method.name, target.image))
                if on_pair:
                    on_pair(method.name, target.image, False)
                continue
            image = load_image(target.image)
            pixels = image_to_tensor(image, base.resolution)  # [3, H, W] in [-1, 1]
            reset_peak_memory(device)
            start = time.perf_counter()
            run = None
            if method.kind in ("textual_inversion", "dreambooth_lora"):
                from .baselines import OptimisationRun

                key = (method.kind, json.dumps(method.overrides, sort_keys=True), target.image)
                run = runs.setdefault(key, OptimisationRun())
            concept = personalize_with(method, base, pixels, systems, {"image": target.image}, run)
            # a continued baseline costs its whole run, not just the steps added here
            seconds = run.seconds if run is not None else time.perf_counter() - start
            peak = concept.info.get("peak_memory_mb")
            spelled = concept.info.get("prompt_placeholder", concept.placeholder)
            prompts = [p.replace("S*", spelled) for p in cfg.prompts]
            pipe = ConceptPipeline(base, concept, cfg.scheduler)
            records = []
            for seed in cfg.seeds:
                images = pipe(prompts, num_images=1, num_inference_steps=cfg.sample_steps,
                              guidance_scale=cfg.guidance, seed=seed)
                for p_index, (prompt, rec) in enumerate(zip(cfg.prompts, score_all(
                        scorers, images, image, target, cfg.prompts))):
                    file = None
                    if cfg.save_images:
                        file = f"images/{method.name}/{pair_file(out, method.name, target.image).stem}/p{p_index}_s{seed}.png"
                        (out / file).parent.mkdir(parents=True, exist_ok=True)
                        save_image_atomic(images[p_index], out / file)
                    records.append({"method": method.name, "kind": method.kind, "steps": method.steps,
                                    "target": target.image, "concept": target.concept, "name": target.name,
                                    "category": target.category, "group": target.group, "prompt": prompt,
                                    "prompt_index": p_index, "seed": seed, "file": file, **rec,
                                    "seconds": round(seconds, 3), "peak_mb": peak, "hard_word": concept.hard_word})
            _write_records(pair_file(out, method.name, target.image), records)
            new.extend(records)
            ran.append((method.name, target.image))
            log.debug("%s on %s: %.2fs", method.name, target.image, seconds)
            if on_pair:
                on_pair(method.name, target.image, True)
    return {"records": existing + new, "ran": ran, "skipped": skipped, "targets": targets}
