"""Build the emoji data set: render clean sources, compose training images, write the manifest.

Layout under ``out``::

    sources/{style}/{key}.png        64x64 RGBA clean renders (the "real images")
    images/{style}/{key}_{i}.png     64x64 RGB composed training examples
    manifest.jsonl                   one row per composed example
    concepts.jsonl, info.json, ATTRIBUTION.md, LICENSES.md, READY
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .data import (STYLES, Concept, compose, dominant_colour, sample_compositions,
                    select_heldout, split_for)
from ..io import write_atomic, write_text_atomic
from .attribution import write_attribution
from .sources import (Sources, discover_sources, index_files, load_openmoji_concepts,
                            noto_supports, render_source)

__all__ = ["build_emoji_dataset", "compose_dataset", "compose_concept", "write_jsonl"]

log = logging.getLogger(__name__)
COMPOSER_VERSION = 1  # bump when composition or captions change, so old images are redone


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _candidates(sources: Sources) -> tuple[list[Concept], dict[str, dict[str, tuple[str, str]]]]:
    """Concepts present in all four styles, with each style's render task (kind, reference)."""
    files = {"twemoji": index_files(sources.twemoji_dir, ".svg"),
             "openmoji": index_files(sources.openmoji_dir, ".svg"),
             "fluent3d": index_files(sources.fluent3d_dir, ".webp")}
    kinds = {"twemoji": "svg", "openmoji": "svg", "fluent3d": "raster"}
    concepts, refs = [], {}
    for c in load_openmoji_concepts(sources.openmoji_json):
        in_all = all(c.key in files[s] for s in files)
        if not in_all or not noto_supports(sources.noto_font, c.emoji):
            continue
        concepts.append(c)
        refs[c.key] = {"noto": ("noto", f"{sources.noto_font}|{c.emoji}")}
        refs[c.key].update({s: (kinds[s], str(files[s][c.key])) for s in files})
    return concepts, refs


def _spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (so a --limit run still covers every category)."""
    if n is None or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def compose_concept(task: tuple) -> list[dict]:
    """Worker: write the K composed images of one (concept, style); return their manifest rows."""
    out, concept, style, split, seed, k, reuse = task
    source_rel = f"sources/{style}/{concept.key}.png"
    source = Image.open(out / source_rel).convert("RGBA")
    rows = []
    comps = sample_compositions(seed, concept.key, style, concept.name, k, dominant_colour(source))
    for i, comp in enumerate(comps):
        rel = f"images/{style}/{concept.key}_{i}.png"
        if not (reuse and (out / rel).is_file()):
            image, _ = compose(source, comp.size, comp.position, comp.background)
            write_atomic(out / rel, lambda tmp: image.save(tmp, format="PNG"))
        rows.append({"file": rel, "source": source_rel, "concept": concept.key,
                     "name": concept.name, "category": concept.category,
                     "subcategory": concept.subcategory, "style": style, "split": split,
                     "background": comp.background, "size": comp.size,
                     "position": comp.position, "caption": comp.caption})
    return rows


def compose_dataset(out: Path, concepts: list[Concept], heldout: set[str], seed: int,
                    compositions: int, workers: int = 2) -> list[dict]:
    """Compose K images per (concept, style) from ``out/sources`` and write manifest.jsonl and
    concepts.jsonl. Images made earlier with the same parameters are reused."""
    params = {"seed": seed, "compositions": compositions, "composer_version": COMPOSER_VERSION}
    stamp = out / "images" / "params.json"
    reuse = stamp.is_file() and json.loads(stamp.read_text()) == params
    stamp.unlink(missing_ok=True)
    for style in STYLES:
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
    jobs = [(out, c, style, split_for(c.key in heldout, style), seed, compositions, reuse)
            for c in concepts for style in STYLES]
    progress = dict(total=len(jobs), desc="compose", unit="concept-style")
    if workers > 1:
        with multiprocessing.Pool(min(workers, 2)) as pool:
            results = list(tqdm(pool.imap(compose_concept, jobs, chunksize=16), **progress))
    else:
        results = [compose_concept(job) for job in tqdm(jobs, **progress)]
    _write_json(stamp, params)
    manifest = [row for rows in results for row in rows]  # jobs are in (concept, style) order
    write_jsonl(out / "manifest.jsonl", manifest)
    write_jsonl(out / "concepts.jsonl", [
        {"concept": c.key, "name": c.name, "category": c.category, "subcategory": c.subcategory,
         "tags": list(c.tags), "heldout": c.key in heldout} for c in concepts])
    return manifest


def build_emoji_dataset(out: Path, compositions: int = 4, seed: int = 0, cache: Path | None = None,
                        limit: int | None = None, workers: int = 2) -> dict:
    """Build (or finish building) the data set in ``out``; returns the info.json contents."""
    start = time.time()
    out = Path(out)
    sources = discover_sources(cache)
    (out / "READY").unlink(missing_ok=True)  # pollers must not pick up a half-rebuilt set
    all_concepts, refs = _candidates(sources)
    heldout = select_heldout(all_concepts)  # over the full set, so --limit keeps the same split
    concepts = _spread(all_concepts, limit)
    log.info("%d concepts in all four styles; building %d", len(all_concepts), len(concepts))
    for style in STYLES:
        (out / "sources" / style).mkdir(parents=True, exist_ok=True)

    tasks = [(kind, ref, str(out / f"sources/{style}/{c.key}.png"))
             for c in concepts for style, (kind, ref) in refs[c.key].items()
             if not (out / f"sources/{style}/{c.key}.png").is_file()]
    failed = set()
    with multiprocessing.Pool(max(1, min(workers, 2))) as pool:
        for path, ok in tqdm(pool.imap_unordered(render_source, tasks, chunksize=8),
                             total=len(tasks), desc="render sources", unit="img"):
            if not ok:
                failed.add(Path(path).stem)
    if failed:
        log.warning("dropping %d concepts whose render failed: %s", len(failed),
                    sorted(failed)[:10])
    concepts = [c for c in concepts if c.key not in failed]

    manifest = compose_dataset(out, concepts, heldout, seed, compositions, workers)
    info = {
        "rows": len(manifest), "concepts": len(concepts),
        "heldout_concepts": sum(c.key in heldout for c in concepts),
        "per_style": dict(Counter(r["style"] for r in manifest)),
        "per_split": dict(Counter(r["split"] for r in manifest)),
        "per_category": dict(Counter(c.category for c in concepts)),
        "seed": seed, "compositions": compositions, "limit": limit,
        "image_size": 64, "composer_version": COMPOSER_VERSION,
        "sources": sources.versions, "build_seconds": round(time.time() - start, 1),
    }
    _write_json(out / "info.json", info)
    write_attribution(out, sources.versions)
    (out / "READY").write_text(json.dumps({k: info[k] for k in ("rows", "concepts", "per_split")})
                               + "\n")
    log.info("wrote %d examples of %d concepts to %s in %.0f s", len(manifest), len(concepts),
             out, info["build_seconds"])
    return info
