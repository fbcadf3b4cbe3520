"""Evaluation records: one JSON line per generated image, one file per (method, target) pair.

``records/<method>/<target>.jsonl`` is written atomically when the pair is complete, so a rerun
skips finished pairs and processes running other methods or target shards never share a file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import DatencoderError
from ..io import write_text_atomic

__all__ = ["read_records", "write_records", "records_file", "pair_file", "parse_shard"]


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


def write_records(path: Path, records: list[dict]) -> None:
    """One pair's records as JSON lines, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
