"""Evaluation harness: every method personalises the same targets and is measured identically.

METHOD.md, "Metrics": for each method and target image (``targets``) the harness personalises
(its phases measured by the one ``cost.measure``, whatever the method: ``row_cost``), generates
every prompt x seed through ``ConceptPipeline``, and scores each image (``scoring``: the emoji
``Evaluator`` by default; with ``scorers: [clip, dino]`` on any supported base, e.g. a folder of
the user's own images, the paper's CLIP-I, CLIP-T and DINO).

Per-image records go to one file per (method, target) pair, ``records/<method>/<target>.jsonl``,
written atomically when the pair is complete (a rerun skips finished pairs, and processes running
other methods or other target shards never touch the same file); ``evaluation_report`` turns them
into tables and plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import from_dict, to_dict
from ..errors import DatencoderError
from ..io import write_json_atomic
from .config import EvalConfig, MethodConfig
from .records import pair_file, read_records, records_file, write_records
from .scoring import load_scorers, score_all
from .targets import method_targets, select_targets

__all__ = ["run_evaluation", "personalize_with", "row_cost"]

log = logging.getLogger(__name__)


def row_cost(concept) -> dict:
    """A record's cost columns, the same for every method: what ``cost.measure`` gave the method's
    phases (``Concept.info``; a continued baseline's whole run): seconds (encoder + tuning),
    peak_mb and peak_of."""
    info = concept.info
    return {"seconds": round(info["encoder_s"] + info["tuning_s"], 3), "peak_mb": info["peak_memory_mb"],
            "peak_of": info["peak_of"]}


def personalize_with(method: MethodConfig, base, pixels: torch.Tensor, system_cache: dict, info: dict,
                     run=None):
    """One method's (concept, base to generate with) for one image ([3, H, W] in [-1, 1]).

    The base to generate with is ``base`` itself except for whole-UNet DreamBooth (its tuned copy).
    ``run``: a baseline's ``OptimisationRun`` to continue (same settings, fewer steps), or None.
    """
    from .baselines import (DreamBoothConfig, DreamBoothLoRAConfig, TextualInversionConfig, dreambooth_lora,
                            dreambooth_unet, textual_inversion)

    if method.kind == "textual_inversion":
        return textual_inversion(base, pixels, from_dict(TextualInversionConfig, {**method.overrides,
                                                                                  "steps": method.steps}),
                                 info=info, run=run), base
    if method.kind == "dreambooth_lora":
        return dreambooth_lora(base, pixels, from_dict(DreamBoothLoRAConfig, {**method.overrides,
                                                                              "steps": method.steps}),
                               info=info, run=run), base
    if method.kind == "dreambooth":
        return dreambooth_unet(base, pixels, from_dict(DreamBoothConfig, {**method.overrides, "steps": method.steps}),
                               info=info, run=run)
    from ..system import EncoderSystem
    from ..tuning import personalize

    if method.name not in system_cache:
        overrides = {s: dict(v) for s, v in method.overrides.items()}
        overrides.setdefault("tune", {})["steps"] = method.steps
        system_cache[method.name] = EncoderSystem.load(method.encoder, base, overrides)
    return personalize(system_cache[method.name], pixels, info=info), base


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

    chosen = [m for m in cfg.methods if methods is None or m.name in methods]
    unknown = sorted(set(methods or []) - {m.name for m in cfg.methods})
    if unknown:
        raise DatencoderError(f"unknown method(s) {unknown}; the config has {[m.name for m in cfg.methods]}")
    from ..system import encoder_path

    missing = [f"{m.name} ({m.encoder})" for m in chosen
               if m.kind == "ours" and not (encoder_path(m.encoder) / "encoder.json").is_file()]
    if missing:  # fail before hours of baselines (and before writing anything), not at the first encoder
        raise DatencoderError(f"no pre-trained encoder for {', '.join(missing)}; pre-train them "
                              "(docs/evaluation.md) or leave them out with --methods")

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
            write_records(records_file(out, m.name), kept)

    pending = [(m, t) for m in chosen for t in method_targets(m, targets) if (m.name, t.image) not in done]
    # models are loaded only when there is work: a finished evaluation re-renders its reports in seconds
    base = load_base(cfg.base, cfg.image_tower, torch_dtype=dtype, device=device) if pending else None
    scorers = load_scorers(cfg) if pending else {}
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
            run = None
            if method.kind != "ours":
                from .baselines import OptimisationRun

                key = (method.kind, json.dumps(method.overrides, sort_keys=True), target.image)
                run = runs.setdefault(key, OptimisationRun())
            concept, generation_base = personalize_with(method, base, pixels, systems, {"image": target.image}, run)
            cost = row_cost(concept)  # a continued baseline costs its whole run, not just the steps added here
            spelled = concept.info.get("prompt_placeholder", concept.placeholder)
            prompts = [p.replace("S*", spelled) for p in cfg.prompts]
            pipe = ConceptPipeline(generation_base, concept, cfg.scheduler)
            records = []
            for seed in cfg.seeds:
                images = pipe(prompts, num_images_per_prompt=1, num_inference_steps=cfg.sample_steps,
                              guidance_scale=cfg.guidance, seed=seed).images
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
                                    **cost, "hard_word": concept.hard_word})
            write_records(pair_file(out, method.name, target.image), records)
            new.extend(records)
            ran.append((method.name, target.image))
            log.debug("%s on %s: %.2fs", method.name, target.image, cost["seconds"])
            if on_pair:
                on_pair(method.name, target.image, True)
    return {"records": existing + new, "ran": ran, "skipped": skipped, "targets": targets}
