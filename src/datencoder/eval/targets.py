"""Evaluation targets: the concept images every method personalises.

From the emoji manifest (N concepts per category of each group, picked by a seeded hash), explicit
images, or a folder of the user's own images with a class word each (CLIP-T replaces S* by it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatencoderError
from .config import MethodConfig, TargetsConfig

__all__ = ["Target", "folder_targets", "select_targets", "method_targets"]


@dataclass
class Target:
    image: str
    concept: str
    name: str
    """The concept's name or class word: CLIP-T replaces S* with it ("grinning face", "dog")."""
    category: str
    style: str
    group: str
    rank: int = 0
    """Its place among its group's concepts of its category (0 = first picked): a method's
    ``per_category`` keeps ranks below it, the same targets whichever shard a process runs."""


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
        splits = set(group.splits or [group.split])
        world = None
        if group.world:
            from ..emoji.world import world_keys

            world = set(world_keys(group.world))
        by_category: dict[str, dict[str, dict]] = {}
        for row in rows:
            if world is not None and (row.get("concept") in world) == group.outside_world:
                continue
            if row.get("split") in splits and row.get("style") == group.style and (
                    group.categories is None or row.get("category") in group.categories):
                by_category.setdefault(row["category"], {}).setdefault(row["concept"], row)
        for category in sorted(by_category):
            concepts = sorted(by_category[category], key=lambda c: hashlib.sha256(
                f"{cfg.seed}:{c}".encode()).hexdigest())
            for rank, concept in enumerate(concepts[: group.per_category]):
                row = by_category[category][concept]
                targets.append(Target(str(root / row[key]), concept, row["name"], category, row["style"],
                                      group.name, rank))
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
            and (method.groups is None or t.group in method.groups)
            and t.category not in method.exclude_categories
            and (method.per_category is None or t.rank < method.per_category)]
