"""The world: the curated set of emoji concepts the embedded base is trained to draw well.

A world of size N is the first N concepts of one fixed order, so smaller worlds are nested in
larger ones (a ladder of sizes compares on the concepts they share). The order:

1. Candidates are the concepts of six categories with distinct, drawable shapes
   (``CATEGORIES``: no flags, no people, no symbols), from the train split, plus the demo's
   concepts (``REQUIRED``, held out from the encoder, not from the base).
2. The required concepts come first, in their given order; then categories take turns; each category cycles through its subcategories (sorted by name);
   each subcategory yields its concepts in SHA-256 order of the key (required ones first).
3. A concept whose head noun (the last word of its name, e.g. "apple" in "green apple",
   "o'clock" in "two o'clock") is already in the world is skipped as a near-duplicate.

The world file is JSON: ``{"rule": ..., "size": N, "concepts": [{"concept", "name",
"category", "subcategory"}, ...]}`` in world order.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

from ..errors import DatencoderError
from ..io import write_json_atomic

CATEGORIES = ("animals-nature", "food-drink", "objects", "travel-places", "activities", "smileys-emotion")
REQUIRED = ("1f34e", "1f986", "1f3f0", "1f3b7")
"""The demo's bundled concepts: red apple, duck, castle, saxophone."""
RULE = "required first, then categories take turns, subcategories cycle, SHA-256 order inside, one concept per head noun"


def head_noun(name: str) -> str:
    return name.lower().split()[-1] if name.strip() else ""


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _entry(concept: dict) -> dict:
    return {k: concept[k] for k in ("concept", "name", "category", "subcategory")}


def choose_world(concepts: list[dict], size: int, required: tuple[str, ...] = REQUIRED) -> list[dict]:
    """The first ``size`` concepts of the world order (module docstring) over concepts.jsonl rows."""
    if size < 1:
        raise DatencoderError(f"world size must be >= 1, got {size}")
    keys = {c["concept"] for c in concepts}
    missing = [k for k in required if k not in keys]
    if missing:
        raise DatencoderError(f"the data set lacks the world's required concepts {missing}")
    pool = [c for c in concepts if c["category"] in CATEGORIES and (not c.get("heldout") or c["concept"] in required)]
    queues: OrderedDict[str, OrderedDict[str, list[dict]]] = OrderedDict((cat, OrderedDict()) for cat in CATEGORIES)
    for sub in sorted({(c["category"], c["subcategory"]) for c in pool}):
        members = [c for c in pool if (c["category"], c["subcategory"]) == sub]
        members.sort(key=lambda c: _sha(c["concept"]))
        queues[sub[0]][sub[1]] = [c for c in members if c["concept"] not in required]
    by_key = {c["concept"]: c for c in pool}
    chosen = [_entry(by_key[k]) for k in required[:size]]
    nouns = {head_noun(c["name"]) for c in chosen}
    pointers = {cat: 0 for cat in CATEGORIES}
    while len(chosen) < size and any(any(q for q in subs.values()) for subs in queues.values()):
        for cat, subs in queues.items():
            live = [s for s, q in subs.items() if q]
            while live and len(chosen) < size:
                sub = live[pointers[cat] % len(live)]
                pointers[cat] += 1
                concept = subs[sub].pop(0)
                if head_noun(concept["name"]) in nouns:
                    live = [s for s, q in subs.items() if q]
                    continue
                nouns.add(head_noun(concept["name"]))
                chosen.append(_entry(concept))
                break
    if len(chosen) < size:
        raise DatencoderError(f"only {len(chosen)} concepts pass the world rule; ask for at most that many")
    return chosen


def write_world(path: str | Path, world: list[dict]) -> None:
    write_json_atomic(Path(path), {"rule": RULE, "size": len(world), "concepts": world})


def read_world(path: str | Path) -> list[dict]:
    """The world file's concepts, in world order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatencoderError(f"no world file at {path}; write one with 'datencoder data world'") from None
    except ValueError:
        data = None
    concepts = data.get("concepts") if isinstance(data, dict) else None
    if not isinstance(concepts, list) or not all(isinstance(c, dict) and "concept" in c for c in concepts):
        raise DatencoderError(f"{path} is not a world file (JSON with a 'concepts' list of {{'concept': key}})")
    return concepts


def world_keys(path: str | Path) -> list[str]:
    return [c["concept"] for c in read_world(path)]
