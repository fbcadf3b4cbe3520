"""Scoring of generated images: the emoji evaluator and/or the paper's metrics (``paper_metrics``).

- identity: cosine of the evaluator's identity embeddings of the generated and the input image;
- concept top-1 / top-5: whether the target concept is among the evaluator's top concepts;
- style: whether the predicted rendering style is the target's (fluent3d for the emoji targets);
- editability: accuracy of the background / position / size the prompt states (only those).

With ``scorers: [clip, dino]``: CLIP-I and DINO (identity), CLIP-T with S* replaced by the target's
class word (editability).
"""

from __future__ import annotations

import re

import torch

from .config import EvalConfig
from .targets import Target

__all__ = ["parse_prompt", "score_images", "score_all", "load_scorers"]


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


@torch.no_grad()
def score_images(evaluator, images, reference, target: Target, prompts: list[str]) -> list[dict]:
    """Scores of generated ``images`` (one per prompt) against the input image ``reference``."""
    logits, emb = evaluator.logits(list(images) + [reference])
    gen_emb, ref_emb = emb[:-1], emb[-1:]
    identity = (gen_emb @ ref_emb.T)[:, 0].tolist()  # both L2-normalised
    concept_index = evaluator.index["concept"].get(target.concept)
    concept_logits = logits["concept"][:-1]
    among = getattr(evaluator, "among", None)  # evaluator class indices to rank among (EvalConfig.among)
    if among is not None:
        concept_logits = concept_logits.clone()
        keep = torch.zeros(concept_logits.shape[1], dtype=torch.bool)
        keep[among] = True
        concept_logits[:, ~keep.to(concept_logits.device)] = float("-inf")
        if concept_index is not None and not keep[concept_index]:
            concept_index = None  # not one of the concepts ranked: no top-k for this target
    top5 = concept_logits.topk(min(5, int(concept_logits.isfinite().all(0).sum())), dim=-1).indices.tolist()
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


def load_scorers(cfg: EvalConfig) -> dict:
    """The scorers ``cfg.scorers`` names, loaded: {"emoji": Evaluator, "paper": PaperMetrics}."""
    scorers: dict = {}
    if "emoji" in cfg.scorers:
        from ..emoji.evaluator import load_evaluator

        scorers["emoji"] = load_evaluator(cfg.evaluator)
        if cfg.among:
            from ..emoji.world import world_keys
            from ..errors import DatencoderError

            index = scorers["emoji"].index["concept"]
            keys = world_keys(cfg.among)
            missing = [k for k in keys if k not in index]
            if missing:
                raise DatencoderError(f"among={cfg.among}: the evaluator has no class for {len(missing)} of its "
                                      f"concepts ({', '.join(missing[:3])}); use the evaluator trained on that world")
            scorers["emoji"].among = [index[k] for k in keys]
    if "clip" in cfg.scorers or "dino" in cfg.scorers:
        from .paper_metrics import PaperMetrics

        scorers["paper"] = PaperMetrics(cfg.clip_model if "clip" in cfg.scorers else None,
                                        cfg.dino_model if "dino" in cfg.scorers else None)
    return scorers
