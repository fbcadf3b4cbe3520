"""Is the encoder healthy on concepts it never saw? Nearest words of its predictions on held-out images.

For each encoder: predict the embedding of S* for every held-out image (exactly the prediction
``datencoder personalize`` starts from: one image, tune.seed's generator) and report the number of
distinct nearest words, the share of the most common one (target: no word for more than 10 % of the
inputs), the mean pairwise cosine of the embeddings, their mean cosine to their nearest word, how
often one of the 5 nearest words names the concept or its category (the paper's "more semantic
tokens"), and how much of a hub the most common word is in the vocabulary (the share of words whose
mean cosine to their 10 nearest words is higher: a small share means a hub). Writes a markdown table
and the per-image words as JSON.

    python benchmarks/encoder_health.py [--encoder DIR ...] [--manifest /work/data/emoji/manifest.jsonl]
        [--split heldout_concept] [--images source|file] [--out reports/encoder_health.md]
"""

from __future__ import annotations

import argparse
from collections import Counter
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from datencoder.io import write_json_atomic, write_text_atomic  # noqa: E402
from datencoder.health import embedding_health, hubness, label_purity  # noqa: E402
from datencoder.image_io import image_to_tensor, load_image  # noqa: E402
from datencoder.system import DEFAULT_ENCODER_DIR, EncoderSystem  # noqa: E402
from datencoder.conditioning import joint_unit, nearest_words  # noqa: E402
from datencoder.tokens import token_word  # noqa: E402

_STOP = {"and", "with", "the", "for", "of", "on", "in", "at", "to", "from", "face", "other"}
"""Words too generic to count as naming a concept ("face" would credit every smiley)."""


def concept_words(row: dict) -> set[str]:
    """Lowercase words of the concept's name, category and subcategory, with simple plural forms."""
    text = " ".join([row["name"], row["category"], row.get("subcategory", "")]).lower()
    words = {w for w in re.findall(r"[a-z]+", text) if len(w) >= 3 and w not in _STOP}
    return words | {w + "s" for w in words} | {w[:-1] for w in words if w.endswith("s")}


def held_out_rows(manifest: Path, split: str, key: str, seed: int = 0) -> list[dict]:
    """One row per held-out concept, its style chosen by a seeded hash (all styles appear)."""
    by_concept: dict[str, list[dict]] = {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if row["split"] == split:
            by_concept.setdefault(row["concept"], []).append(row)
    chosen = []
    for concept, rows in sorted(by_concept.items()):
        rows = sorted({r[key]: r for r in rows}.values(), key=lambda r: r[key])
        pick = int(hashlib.sha256(f"{seed}:{concept}".encode()).hexdigest(), 16) % len(rows)
        chosen.append(rows[pick])
    return chosen


_HUBNESS: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def measure(encoder_dir: Path, rows: list[dict], root: Path, key: str) -> tuple[dict, list[dict]]:
    system = EncoderSystem.load(encoder_dir)
    system.encoder.eval()
    embeddings = []
    for row in rows:
        pixels = image_to_tensor(load_image(root / row[key]), system.base.resolution)
        gen = torch.Generator().manual_seed(system.cfg.tune.seed)  # as personalize's prediction
        embeddings.append(system.predict(pixels.unsqueeze(0), gen).embedding[0])
    embeddings = torch.stack(embeddings)  # [N, D]

    def word_of(j: int) -> str:
        return token_word(system.base.tokenizer, system.vocab_ids[j])

    words = [concept_words(r) for r in rows]
    dims = system.base.token_dims
    health = embedding_health(embeddings, system.vocab_table, word_of, words, k=5, dims=dims)
    table = system.vocab_table
    key_ = (tuple(table.shape), float(table.sum()))
    if key_ not in _HUBNESS:  # the same base for every encoder: computed once
        _HUBNESS[key_] = hubness(joint_unit(table, dims))
    scores = _HUBNESS[key_]
    index, _ = nearest_words(embeddings, table, dims, 5)
    top = Counter(index[:, 0].tolist()).most_common(1)[0][0]  # as embedding_health's top word
    health["top_word_hub_share"] = round(float((scores > scores[top]).float().mean()), 4)
    if key == "file":  # composed images: does the word follow the background colour or the concept?
        first = [word_of(j) for j in index[:, 0].tolist()]
        health["background_purity"] = round(label_purity([r["background"] for r in rows], first), 4)
        health["concept_category_purity"] = round(label_purity([r["category"] for r in rows], first), 4)
        colour = [{r["background"], {"gray": "grey"}.get(r["background"], r["background"])} for r in rows]
        health["names_background_top5"] = round(sum(any(word_of(j).lower() in c for j in idx)
                                                     for c, idx in zip(colour, index.tolist())) / len(rows), 4)
    per_image = [{"image": r[key], "concept": r["name"], "category": r["category"],
                  "nearest": [word_of(j) for j in idx]} for r, idx in zip(rows, index.tolist())]
    meta = json.loads((encoder_dir / "encoder.json").read_text())
    health.update(encoder=str(encoder_dir), base=meta["base"], contrastive_weight=meta["config"]["loss"]
                  ["contrastive_weight"], steps=meta.get("info", {}).get("step"), vocabulary=len(system.vocab_ids))
    return health, per_image


def _table(results: list[dict]) -> list[str]:
    lines = ["| encoder | steps | contrastive | inputs | distinct nearest words | top word (share) | "
             "top word's hub rank | mean pairwise cosine | cosine to nearest word | "
             "a top-5 word names the concept or category | target met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['encoder']}` | {r['steps']} | {r['contrastive_weight']} | {r['inputs']} | "
                     f"{r['distinct_nearest']} | {r['top_word']} ({100 * r['top_word_share']:.1f} %) | "
                     f"top {100 * r['top_word_hub_share']:.0f} % | "
                     f"{r['mean_pairwise_cosine']:.3f} | {r['nearest_cosine']:.3f} | {100 * r['semantic_top5']:.1f} % | "
                     f"{'yes' if r['top_word_share'] <= 0.10 else 'no'} |")
    if any("background_purity" in r for r in results):
        lines += ["", "What decides the word (share of inputs whose word is the most common one of their "
                  "background colour / their emoji category; 1.0: the word is a function of it):", "",
                  "| encoder | by background colour | by category | a top-5 word names the background colour |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['encoder']}` | {r['background_purity']:.2f} | {r['concept_category_purity']:.2f} | "
                  f"{100 * r['names_background_top5']:.1f} % |" for r in results if "background_purity" in r]
    lines += ["", "Most common nearest words (count):", ""]
    for r in results:
        lines.append(f"- `{r['encoder']}`: " + ", ".join(f"{w} ({c})" for w, c in r["most_common"]))
    return lines


_KINDS = {"source": "clean renders (the one image a user brings: the concept on a plain background)",
          "file": "composed renders (the kind of image pre-training used: a background colour, size and position)"}


def markdown(results: dict[str, list[dict]], command: str, setup: str) -> str:
    lines = ["# Encoder health on held-out concepts", "",
             "Nearest real words of the encoder's predicted S* embeddings (the prediction `datencoder personalize` "
             "starts from) on images of concepts no training path saw. Target (issue 11): no single nearest word "
             "for more than 10 % of the inputs.", "", f"Command: `{command}`", "", setup]
    for kind, rows in results.items():
        lines += ["", f"## {_KINDS[kind][0].upper()}{_KINDS[kind][1:]}", "", *_table(rows)]
    lines += ["", "Concept words: the lowercase words (3+ letters) of the emoji's name, category and subcategory, "
              "with simple plural forms, without `and`, `with`, `face`, ...; per-image nearest words are in "
              "the JSON file next to this one. Pre-training logs the same collapse signal while it runs: "
              "`health_distinct_nearest` and `health_top_word_share` of the predictions of each log window, "
              "in `log.jsonl`. Hub rank: the share of the vocabulary's words that are more of a hub than the top "
              "word (mean cosine to their 10 nearest words; top 1 % would be a hub, top 50 % an ordinary word)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", action="append", default=None,
                        help="encoder folder (repeatable); default: the shipped one")
    parser.add_argument("--manifest", default="/work/data/emoji/manifest.jsonl")
    parser.add_argument("--split", default="heldout_concept")
    parser.add_argument("--images", choices=("source", "file", "both"), default="both",
                        help="source: the clean render (a user's one image); file: a composed training-style image "
                             "(also says whether the word follows the background colour); both: a table of each")
    parser.add_argument("--out", default="reports/encoder_health.md")
    args = parser.parse_args(argv)
    manifest = Path(args.manifest)
    if not manifest.is_file():
        print(f"error: no manifest at {manifest}", file=sys.stderr)
        return 2
    kinds = ["source", "file"] if args.images == "both" else [args.images]
    results: dict[str, list[dict]] = {}
    images: dict[str, list[dict]] = {}
    shipped = str(DEFAULT_ENCODER_DIR)
    start = time.perf_counter()
    for kind in kinds:
        rows = held_out_rows(manifest, args.split, kind)
        if len(rows) < 100:
            print(f"warning: only {len(rows)} held-out images", file=sys.stderr)
        for enc in args.encoder or [shipped]:
            health, per_image = measure(Path(enc), rows, manifest.parent, kind)
            print(json.dumps({k: v for k, v in health.items() if k != "most_common"}))
            # the doc names the shipped encoder by its package path, not this machine's
            health["encoder"] = health["encoder"].replace(str(Path(shipped).parents[1]) + "/", "src/datencoder/")
            results.setdefault(kind, []).append(health)
            images[f"{enc} ({kind})"] = per_image
    setup = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs), "
             f"no GPU, torch threads {torch.get_num_threads()}; {len(rows)} images of split `{args.split}` per "
             f"table (one per concept, style by seeded hash; for composed renders one of the concept's renders, "
             f"also by seeded hash); {time.perf_counter() - start:.0f} s in all.")
    command = "python " + " ".join(["benchmarks/encoder_health.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    write_text_atomic(out, markdown(results, command, setup))
    write_json_atomic(out.with_suffix(".json"), {"command": command, "setup": setup, "results": results,
                                                 "images": images})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
