"""``datencoder data emoji``: build the emoji data set of the embedded default model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..emoji.build import build_emoji_dataset
from ..errors import DatencoderError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["emoji"], help="which data set to build")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--compositions", type=int, default=4,
                        help="composed examples per (concept, style) (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compositions (default 0)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="npm download cache (default ~/.cache/datencoder/npm)")
    parser.add_argument("--limit", type=int, default=None,
                        help="build only N concepts spread over all categories (for a quick check)")


def run(args: argparse.Namespace) -> int:
    if args.compositions < 1:
        raise DatencoderError(f"--compositions must be >= 1, got {args.compositions}")
    if args.limit is not None and args.limit < 1:
        raise DatencoderError(f"--limit must be >= 1, got {args.limit}")
    info = build_emoji_dataset(args.out, compositions=args.compositions, seed=args.seed,
                               cache=args.cache, limit=args.limit)
    log.info("per split: %s", info["per_split"])
    return 0
