"""Quality of the embedded default minisd-emoji, scored by the measuring evaluator.

A fixed prompt set over held-in (train-split) concepts, ``--seeds`` images per prompt, DDIM with
classifier-free guidance through a stock diffusers StableDiffusionPipeline. The evaluator reads
every image: concept top-1/top-5, style, background, position and size accuracy, each over the
prompts that name that attribute. Two references are measured with the same evaluator: its own
validation accuracy (composition index 3 of every concept-style, never trained on) and its
accuracy on the real composite of each prompt (what a perfect generator would score).

    python benchmarks/minisd_quality.py [--prompts 200] [--seeds 4] [--out reports/minisd_quality.json]
    python benchmarks/minisd_quality.py --world data/world128.json --among data/world32.json ...

``--world`` builds the prompts over a world's concepts (``datencoder data world``) and adds concept
top-1/top-5 *among the world's concepts* (the evaluator's probabilities restricted to them); each
``--among`` world (nested in it) is scored the same way on the prompts of its own concepts.

``--data`` (the emoji data set), ``--evaluator`` and ``--pretrained`` are checked before any image
is generated; a missing one ends the run with a one-line error.
Per-image predictions are appended to ``--work``/images.jsonl as batches finish, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datencoder.base import load_base  # noqa: E402
from datencoder.emoji.data import BACKGROUNDS, POSITIONS, SIZES, compose, dominant_colour  # noqa: E402
from datencoder.emoji.batches import composition_index, load_rows_uint8, read_rows  # noqa: E402
from datencoder.emoji.evaluator import HEADS, load_evaluator  # noqa: E402
from datencoder.emoji.minisd.sampling import make_pipeline, vae_roundtrip  # noqa: E402
from datencoder.errors import DatencoderError  # noqa: E402

STYLES = ("noto", "twemoji", "openmoji")  # fluent3d is the held-out style of every concept
# Every 8th prompt drops the style, every 8th (offset 4) drops size and position; those
# attributes are then not scored for that prompt.
TEMPLATES = {
    "full": "{name}, {style} style, {size}, {position}, on a {background} background",
    "no_style": "{name}, {size}, {position}, on a {background} background",
    "no_layout": "{name}, {style} style, on a {background} background",
}
SCORED = {"full": ("style", "size", "position", "background"), "no_style": ("size", "position", "background"),
          "no_layout": ("style", "background")}


def build_prompts(root: Path, n: int, seed: int = 0, world: list[dict] | None = None) -> list[dict]:
    """n prompts over distinct train-split concepts (or the world's) with drawn style, size, position, background."""
    if world is not None:
        concepts = sorted((c["concept"], c["name"]) for c in world)
    else:
        rows = read_rows(root, ["train"])
        concepts = sorted({r["concept"]: r["name"] for r in rows}.items())
    if not concepts:
        raise DatencoderError(f"{root / 'manifest.jsonl'} has no train-split rows to build prompts from")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(concepts))
    prompts = []
    for i in range(n):
        key, name = concepts[int(order[i % len(concepts)])]
        style = STYLES[i % len(STYLES)]
        source = Image.open(root / "sources" / style / f"{key}.png").convert("RGBA")
        # As the data set does: never a background of the emoji's own dominant colour.
        backgrounds = [b for b in BACKGROUNDS if b != dominant_colour(source)]
        spec = {"concept": key, "name": name, "style": style,
                "size": list(SIZES)[rng.integers(len(SIZES))],
                "position": POSITIONS[rng.integers(len(POSITIONS))],
                "background": backgrounds[rng.integers(len(backgrounds))]}
        spec["variant"] = "no_style" if i % 8 == 0 else "no_layout" if i % 8 == 4 else "full"
        spec["prompt"] = TEMPLATES[spec["variant"]].format(**spec)
        prompts.append(spec)
    return prompts


def score(records: list[dict], evaluator) -> dict:
    """Accuracy per attribute over the records that name it, plus concept top-5."""
    out = {}
    for head in HEADS:
        hits = [r[f"{head}_ok"] for r in records if head == "concept" or head in SCORED[r["variant"]]]
        out[head] = {"accuracy": float(np.mean(hits)), "n": len(hits)}
    out["concept_top5"] = {"accuracy": float(np.mean([r["concept_top5"] for r in records])), "n": len(records)}
    return out


def world_score(records: list[dict], name: str, keys: list[str]) -> dict:
    """Concept top-1/top-5 among a world's concepts over the records of its concepts' prompts."""
    mine = [r for r in records if r["concept"] in set(keys)]
    ranks = np.array([r["world_ranks"][name] for r in mine])
    return {"concepts": len(keys), "n": len(mine), "top1": float(np.mean(ranks == 0)) if len(mine) else None,
            "top5": float(np.mean(ranks < 5)) if len(mine) else None,
            "mean_rank": float(np.mean(ranks)) if len(mine) else None, "chance_top5": min(1.0, 5 / len(keys))}


def world_ranks(probs: torch.Tensor, evaluator, spec: dict, worlds: dict[str, list[str]]) -> dict[str, int]:
    """The rank (0 = first) of the prompt's concept among each world that holds it."""
    out = {}
    for name, keys in worlds.items():
        if spec["concept"] in keys:
            sub = probs[[evaluator.index["concept"][k] for k in keys]]
            out[name] = int((sub > sub[keys.index(spec["concept"])]).sum())
    return out


def judge(evaluator, images: list[Image.Image], specs: list[dict], worlds: dict[str, list[str]] | None = None) -> list[dict]:
    pred = evaluator.predict(images)
    top5 = pred["concept"]["probs"].topk(5, dim=-1).indices
    records = []
    for i, spec in enumerate(specs):
        rec = {"prompt": spec["prompt"], "variant": spec["variant"], "seed": spec.get("seed", -1),
               "concept": spec["concept"]}
        if worlds:
            rec["world_ranks"] = world_ranks(pred["concept"]["probs"][i], evaluator, spec, worlds)
        for head in HEADS:
            rec[f"{head}_pred"] = pred[head]["labels"][i]
            rec[f"{head}_ok"] = pred[head]["labels"][i] == spec[head]
        rec["concept_top5"] = evaluator.index["concept"][spec["concept"]] in top5[i].tolist()
        records.append(rec)
    return records


def evaluator_validation(evaluator, root: Path) -> dict:
    # a world's evaluator knows only the world's concepts: it is validated on those
    rows = [r for r in read_rows(root) if composition_index(r) == 3 and r["concept"] in evaluator.index["concept"]]
    images = load_rows_uint8(root, rows).float() / 127.5 - 1
    logits, _ = evaluator.logits(images)
    out = {}
    for head in HEADS:
        truth = torch.tensor([evaluator.index[head][r[head]] for r in rows])
        out[head] = float((logits[head].argmax(-1) == truth).float().mean())
    truth = torch.tensor([evaluator.index["concept"][r["concept"]] for r in rows])
    out["concept_top5"] = float((logits["concept"].topk(5, -1).indices == truth[:, None]).any(-1).float().mean())
    out["n"] = len(rows)
    return out


@torch.no_grad()
def save_grid(path: Path, columns: list[list[Image.Image]], scale: int = 2) -> None:
    """columns[c][r]: one image per row; written as a PNG, each tile upscaled ``scale``x."""
    side = columns[0][0].width * scale
    grid = Image.new("RGB", (side * len(columns), side * len(columns[0])), "white")
    for c, col in enumerate(columns):
        for r, img in enumerate(col):
            grid.paste(img.resize((side, side), Image.NEAREST), (c * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--pretrained", default="minisd-emoji")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=8, help="prompts per pipeline call (x seeds images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/work/runs/minisd/quality")
    p.add_argument("--out", default="reports/minisd_quality.json")
    p.add_argument("--grid", default="docs/images/minisd_quality_grid.png")
    p.add_argument("--grid-rows", type=int, default=12)
    p.add_argument("--world", default=None, help="a world file: prompts over its concepts, scored among them too")
    p.add_argument("--among", nargs="*", default=[], help="world files nested in --world, each scored among itself")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop generating after this long and score the prompts done so far (0: no limit)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    work = Path(args.work)
    try:  # every input up front, before a work folder is made or an image generated
        from datencoder.emoji.world import read_world, world_keys

        world = read_world(args.world) if args.world else None
        worlds = {Path(w).stem: world_keys(w) for w in ([args.world] if args.world else []) + args.among}
        specs = build_prompts(root, args.prompts, world=world)
        evaluator = load_evaluator(args.evaluator)
        base = load_base(args.pretrained, with_image_tower=False).freeze()
    except DatencoderError as err:
        raise SystemExit(f"minisd_quality: {err}") from None
    work.mkdir(parents=True, exist_ok=True)
    pipe = make_pipeline(base.vae, base.unet, base.scheduler, base.tokenizer, base.text_encoder)
    settings = {k: getattr(args, k) for k in ("prompts", "seeds", "steps", "guidance", "pretrained", "world")}
    log_path = work / "images.jsonl"
    done = []
    if log_path.exists():
        done = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if not done or done[0].get("settings") != settings:
            done = []
    if not done:
        log_path.write_text(json.dumps({"settings": settings}) + "\n")
    records = [r for r in done if "prompt" in r]
    resumed = len(records)
    start_prompt = len(records) // args.seeds
    grid_cols: list[list[Image.Image]] = [[] for _ in range(args.seeds)]
    gen_seconds = 0.0
    began = time.monotonic()
    for start in tqdm(range(start_prompt, len(specs), args.batch), desc="generate", unit="batch"):
        if args.max_minutes and time.monotonic() - began > args.max_minutes * 60:
            break
        batch = specs[start : start + args.batch]
        prompts = [s["prompt"] for s in batch for _ in range(args.seeds)]
        gens = [torch.Generator().manual_seed(seed) for _ in batch for seed in range(args.seeds)]
        t0 = time.perf_counter()
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=gens, output_type="pil").images
        gen_seconds += time.perf_counter() - t0
        flat_specs = [dict(s, seed=seed) for s in batch for seed in range(args.seeds)]
        new = judge(evaluator, images, flat_specs, worlds)
        records += new
        with log_path.open("a") as f:
            for rec in new:
                f.write(json.dumps(rec) + "\n")
        for i, img in enumerate(images):
            if start + i // args.seeds < args.grid_rows:
                grid_cols[i % args.seeds].append(img)
    n_done = len(records) // args.seeds
    real = [compose(Image.open(root / "sources" / s["style"] / f"{s['concept']}.png"), s["size"], s["position"],
                    s["background"])[0] for s in specs[:n_done]]
    if grid_cols[0] and start_prompt == 0:  # a resumed run does not have the first rows in memory
        save_grid(Path(args.grid), [real[: len(grid_cols[0])]] + grid_cols)
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"2-core CPU, no GPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                   f"{args.threads} threads",
        "date": datetime.date.today().isoformat(),
        "settings": settings | {"scheduler": "DDIM", "prompts_scored": n_done, "images_scored": len(records)},
        "generated": score(records, evaluator),
        "generated_full_prompts_only": score([r for r in records if r["variant"] == "full"], evaluator),
        "real_composites_of_the_prompts": score(real_records := judge(evaluator, real, specs[:n_done], worlds), evaluator),
        "vae_reconstructions_of_the_prompts": score(
            vae_records := judge(evaluator, vae_roundtrip(base.vae, real), specs[:n_done], worlds), evaluator),
        "among_world": {name: {"generated": world_score(records, name, keys),
                               "real_composites": world_score(real_records, name, keys),
                               "vae_reconstructions": world_score(vae_records, name, keys)}
                        for name, keys in worlds.items()},
        "evaluator_validation": evaluator_validation(evaluator, root),
        "seconds_per_image_this_run": gen_seconds / max(1, len(records) - resumed),
        "grid": args.grid,
        "grid_layout": "rows: the first prompts; column 1: the real composite, then one column per seed",
        "prompts_shown": [s["prompt"] for s in specs[: min(args.grid_rows, n_done)]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("generated", "real_composites_of_the_prompts", "vae_reconstructions_of_the_prompts", "evaluator_validation", "among_world")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
