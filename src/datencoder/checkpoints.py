"""Artifacts on disk: atomic safetensors + JSON, checked on load.

Every artifact is a folder with ``<kind>.safetensors`` (tensors, with ``datencoder.kind`` in the
header metadata) and ``<kind>.json`` (configuration and identity). Files are written to a
temporary name and renamed, so a crash never leaves a half-written artifact. Loading names the
problem in one line: missing, corrupt, foreign (not made by datencoder), the wrong kind, or made
for another base model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DatencoderError

__all__ = [
    "write_atomic",
    "write_json_atomic",
    "write_text_atomic",
    "save_file_atomic",
    "save_tensors_atomic",
    "load_tensors",
    "read_json",
    "check_base",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


def _atomic(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp_path)`` writes the artifact; it appears at ``path`` whole or not at all."""
    _atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_file_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A plain safetensors file (no datencoder kind), written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], kind: str,
                        metadata: dict[str, str] | None = None) -> None:
    meta = {"datencoder.kind": kind, "datencoder.format": str(FORMAT_VERSION), **(metadata or {})}
    save_file_atomic(path, tensors, meta)


def load_tensors(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """Load a datencoder safetensors file of the given kind, or fail with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DatencoderError(f"{path} not found; pass the folder written by datencoder ({kind})")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise DatencoderError(f"{path} is not a readable safetensors file (corrupt or truncated); "
                              f"re-create it with datencoder") from None
    found = meta.get("datencoder.kind")
    if found is None:
        raise DatencoderError(f"{path} is a safetensors file not written by datencoder; "
                              f"expected a datencoder {kind}")
    if found != kind:
        raise DatencoderError(f"{path} holds a datencoder {found}, not a {kind}")
    if int(meta.get("datencoder.format", "0")) > FORMAT_VERSION:
        raise DatencoderError(f"{path} was written by a newer datencoder; upgrade the package")
    return tensors


def read_json(path: str | Path, kind: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DatencoderError(f"{path} not found; pass the folder written by datencoder ({kind})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DatencoderError(f"{path} is not valid JSON (corrupt); re-create the {kind}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise DatencoderError(f"{path} is not a datencoder {kind} description")
    return data


def check_base(artifact: str, recorded: dict, base) -> None:
    """Refuse an artifact made for another base model."""
    if recorded.get("fingerprint") != base.fingerprint:
        raise DatencoderError(
            f"{artifact} was made for base model '{recorded.get('name')}' "
            f"(fingerprint {recorded.get('fingerprint')}), but the loaded base is '{base.name}' "
            f"({base.fingerprint}); load the matching base with --base/model.pretrained"
        )
