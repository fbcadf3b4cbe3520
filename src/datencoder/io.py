"""Artifacts on disk: atomic safetensors + JSON, checked on load.

Every artifact is a folder with ``<kind>.safetensors`` (tensors, with ``datencoder.kind`` in the
header metadata) and ``<kind>.json`` (configuration and identity). Files are written to a
temporary name and renamed, so a crash never leaves a half-written artifact. Loading names the
problem in one line: missing, corrupt, foreign (not made by datencoder), the wrong kind, or made
for another base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DatencoderError

__all__ = [
    "write_atomic",
    "atomic_dir",
    "replace_dir",
    "to_pixels",
    "to_uint8",
    "to_pil",
    "write_json_atomic",
    "write_text_atomic",
    "save_file_atomic",
    "save_tensors_atomic",
    "load_tensors",
    "read_json",
    "check_base",
    "check_output",
    "file_sha256",
    "FORMAT_VERSION",
    "ASSETS",
]

FORMAT_VERSION = 1

ASSETS = Path(__file__).resolve().parent / "assets"
"""The package's shipped assets (embedded base, encoder, evaluator, demo images)."""


def _atomic(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = None
    umask = _umask()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        # after writing: mkstemp makes 0600 and some writers (safetensors) re-create the file;
        # every artifact gets the usual permissions, the same for tensors and JSON
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as err:  # full disk, read-only or vanished folder: one line, not a traceback
        raise DatencoderError(f"could not write {path} ({err.strerror or _first_line(err)}); "
                              "check free space and permissions, or choose another output") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_output(path: str | Path, option: str = "--out", folder: bool = True) -> Path:
    """Fail now, before any compute, if ``path`` (a folder, or a file when ``folder`` is False)
    cannot be written: an existing file where a folder goes (or the reverse), a parent that is a
    file, a read-only or full file system. A probe file is created and removed, because
    permission bits say nothing for root and nothing about read-only mounts."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise DatencoderError(f"{option} {path} is an existing file; pass a folder")
    if not folder and path.is_dir():
        raise DatencoderError(f"{option} {path} is a folder; pass a file name")
    ancestor = path if folder else path.parent
    ancestor = ancestor.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DatencoderError(f"{option} {path}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".datencoder-probe.", dir=ancestor)
        try:
            os.write(fd, b"\0" * 4096)  # a full disk refuses data even where it still makes an inode
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise DatencoderError(f"cannot write to {option} {path} ({err.strerror or _first_line(err)} in "
                              f"{ancestor}); choose another location") from None
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (pairs an artifact's JSON with its tensors)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# -- folders ---------------------------------------------------------------------------------
def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the finished folder ``tmp`` in at ``final`` (an older ``final`` is replaced).

    Two renames: ``final`` -> ``.final.old``, ``tmp`` -> ``final``. A crash between them leaves the
    previous folder whole at ``.final.old`` (readers that resume look there too)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write the whole folder into ``tmp``; on success it replaces
    ``out`` in one swap (``replace_dir``), on any error ``tmp`` is removed and ``out`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- pixels ----------------------------------------------------------------------------------
# The one conversion pair between 8-bit images and the [-1, 1] float tensors every model here
# reads and writes (channels first). Everything else calls these.
def to_pixels(images: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """8-bit RGB (a PIL image, or an ``[..., H, W, 3]`` uint8 array/tensor) -> float32
    ``[..., 3, H, W]`` in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = np.array(images.convert("RGB"))  # a copy: PIL's buffer is read-only
    x = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
    return x.float().movedim(-1, -3) / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float ``[..., 3, H, W]`` in [-1, 1] (clamped) -> uint8 ``[..., H, W, 3]``."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def to_pil(pixels: torch.Tensor) -> Image.Image | list[Image.Image]:
    """``[3, H, W]`` in [-1, 1] -> one RGB image; ``[N, 3, H, W]`` -> a list of them."""
    array = to_uint8(pixels).numpy()
    if array.ndim == 3:
        return Image.fromarray(array)
    return [Image.fromarray(a) for a in array]
