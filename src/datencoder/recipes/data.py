"""``datencoder data emoji``: build the emoji data set of the embedded default model;
``datencoder data world``: choose the world (the concepts the embedded base is trained to draw)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..emoji.build import build_emoji_dataset
from ..errors import DatencoderError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["emoji", "world"],
                        help="emoji: build the data set; world: write a world file from a built data set")
    parser.add_argument("--out", type=Path, required=True, help="output folder (world: the JSON file)")
    parser.add_argument("--data", type=Path, default=Path("data/emoji"),
                        help="world: the built emoji data set (default data/emoji)")
    parser.add_argument("--size", type=int, default=128, help="world: how many concepts (default 128)")
    parser.add_argument("--compositions", type=int, default=4,
                        help="composed examples per (concept, style) (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compositions (default 0)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="npm download cache (default ~/.cache/datencoder/npm)")
    parser.add_argument("--limit", type=int, default=None,
                        help="build only N concepts spread over all categories (for a quick check)")


def _world(args: argparse.Namespace) -> int:
    import json

    from ..emoji.world import choose_world, write_world

    path = args.data / "concepts.jsonl"
    if not path.exists():
        raise DatencoderError(f"no {path}; build the data set first: datencoder data emoji --out {args.data}")
    concepts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    world = choose_world(concepts, args.size)
    write_world(args.out, world)
    log.info("wrote a world of %d concepts to %s", len(world), args.out)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dataset == "world":
        return _world(args)
    if args.compositions < 1:
        raise DatencoderError(f"--compositions must be >= 1, got {args.compositions}")
    if args.limit is not None and args.limit < 1:
        raise DatencoderError(f"--limit must be >= 1, got {args.limit}")
    info = build_emoji_dataset(args.out, compositions=args.compositions, seed=args.seed,
                               cache=args.cache, limit=args.limit)
    log.info("per split: %s", info["per_split"])
    return 0
