"""Artifacts on disk: atomic safetensors + JSON, checked on load.

Every artifact is a folder with ``<kind>.safetensors`` (tensors, with ``datencoder.kind`` in the
header metadata) and ``<kind>.json`` (configuration and identity). Files are written to a
temporary name and renamed, so a crash never leaves a half-written artifact. Loading names the
problem in one line: missing, corrupt, foreign (not made by datencoder), the wrong kind, or made
for another base model.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
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
    "artifact_dir",
    "check_replaceable",
    "claim_output",
    "OutputBusy",
    "check_free_space",
    "check_finite",
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
    "tensors_sha256",
    "FORMAT_VERSION",
    "ASSETS",
]

log = logging.getLogger(__name__)

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
    except (OSError, SafetensorError) as err:  # full disk, read-only or vanished folder: one line
        raise _write_error(path, err) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _write_error(path: str | Path, err: BaseException) -> DatencoderError:
    """The one-line error of a failed write (safetensors reports the OS error inside its message)."""
    text = getattr(err, "strerror", None) or _first_line(err)
    if "No space left" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
        text = "no space left on the device"
    return DatencoderError(f"could not write {path} ({text}); check free space and permissions, "
                           "or choose another output")


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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of tensors' names, dtypes, shapes and bytes, in name order.

    Unlike the file's hash it does not depend on how a save lays out the safetensors header
    (whose metadata order can differ between two saves of the same tensors).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp_path)`` writes the artifact; it appears at ``path`` whole or not at all."""
    _atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_finite(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse tensors holding NaN or infinity: one line ``{what}: tensor 'k' holds NaN; {fix}``."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinity"
            raise DatencoderError(f"{what}: tensor '{name}' holds {bad}; {fix}")


def save_file_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A plain safetensors file (no datencoder kind), written atomically; NaN or infinity is refused
    (nothing non-finite is ever written as a result)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(tensors, f"refusing to write {path}", "nothing non-finite is saved")
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
    check_finite(tensors, str(path), f"the {kind} is damaged; re-create it")
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
    if recorded.get("fingerprint") == base.fingerprint:
        return
    if recorded.get("name") == base.name:  # same name, other weights: say that, not the name twice
        raise DatencoderError(
            f"{artifact} was made for other weights of base model '{base.name}' (fingerprint "
            f"{recorded.get('fingerprint')}, the loaded copy has {base.fingerprint}); the model was retrained "
            "or changed since: re-create the artifact with this copy, or load the copy it was made with")
    raise DatencoderError(
        f"{artifact} was made for base model '{recorded.get('name')}' "
        f"(fingerprint {recorded.get('fingerprint')}), but the loaded base is '{base.name}' "
        f"({base.fingerprint}); load the matching base with --base/model.pretrained"
    )


# -- folders ---------------------------------------------------------------------------------
def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the finished folder ``tmp`` in at ``final`` (an older ``final`` is replaced).

    Two renames: ``final`` -> ``.final.old``, ``tmp`` -> ``final``, then ``.final.old`` is deleted.
    There is no moment without a whole folder: a crash between the renames leaves the previous
    folder at ``.final.old``, which readers take instead (``artifact_dir``)."""
    tmp, final = Path(tmp), Path(final)
    old = _old(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    # else: a crash left only .final.old; it stays until the new folder is in place
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def artifact_dir(path: str | Path) -> Path:
    """``path``, or its ``.path.old`` when a run stopped between ``replace_dir``'s two renames
    (the previous artifact is there, whole); a warning line says so."""
    path = Path(path)
    old = _old(path)
    if not path.exists() and old.is_dir():
        log.warning("%s was being replaced when a run stopped; reading the previous version from %s", path, old)
        return old
    return path


def check_replaceable(folder: str | Path, names: tuple[str, ...] | set[str], what: str,
                      option: str = "--out") -> None:
    """Refuse to replace ``folder`` whole when it holds anything but the files ``names`` of an
    earlier ``what`` (a user's own files would go with it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in names)
    if foreign:
        raise DatencoderError(f"{option} {folder} holds {foreign[0]}, which is not part of a {what}; "
                              "pass a new or empty folder (the folder is replaced whole)")


def _usual_modes(tree: Path) -> None:
    """The usual permissions for a finished folder: mkdtemp makes it 0700 and some writers
    (safetensors, inside diffusers' save_pretrained too) make files 0600."""
    umask = _umask()
    os.chmod(tree, 0o777 & ~umask)
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write the whole folder into ``tmp``; on success it replaces
    ``out`` in one swap (``replace_dir``), on any error ``tmp`` is removed and ``out`` is untouched;
    a write that fails for the disk (full, read-only) is one line."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        raise _write_error(final, err) from err
    try:
        yield tmp
        _usual_modes(tmp)
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, err) from err
    except DatencoderError as err:  # a file's write failed: name where it was going, not the temp folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatencoderError(str(err).replace(str(tmp), str(final))) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OutputBusy(DatencoderError):
    """Another live datencoder run holds the output (``claim_output``)."""


@contextlib.contextmanager
def claim_output(path: str | Path, option: str = "--out", folder: bool = True) -> Iterator[Path]:
    """Hold ``path`` for one run: ``.<name>.lock`` beside it is created exclusively (an atomic
    claim), so a second run on the same output fails at once instead of both reporting success.
    A lock left by a process that is gone (kill -9) is taken over."""
    path = Path(path)
    lock = path.absolute().with_name(f".{path.name}.lock")
    owner = f"{socket.gethostname()} {os.getpid()}"
    check_output(path, option, folder)  # writable at all (creates nothing)
    for _ in range(2):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error(lock.parent, err) from None
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise OutputBusy(f"{option} {path} is being written by another datencoder run (process "
                                      f"{holder}); wait for it or choose another {option}") from None
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        except OSError as err:
            raise DatencoderError(f"cannot write to {option} {path} ({err.strerror or _first_line(err)}); "
                                  "choose another location") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(owner)
        break
    else:
        raise DatencoderError(f"{option} {path}: could not take {lock}; remove it if no datencoder run is writing there")
    try:
        yield path
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> str | None:
    """The live process holding ``lock`` ('host pid'), or None when it is gone (or the file is)."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return None if not lock.exists() else "unknown"
    if host != socket.gethostname():
        return f"{pid} on {host}"  # another machine's run: it cannot be checked, so it is kept
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, ValueError):
        pass
    return pid


def check_free_space(path: str | Path, need_bytes: int, option: str = "--out") -> None:
    """Refuse, before any compute, an output whose file system has less room than ``need_bytes``
    (plus 10 % and 1 MB of margin, as the temp copy and the old version coexist briefly)."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = int(need_bytes * 1.1) + 2**20
    if free < need:
        raise DatencoderError(f"{option} {path}: {_mb(free)} free on its file system, the output needs about "
                              f"{_mb(need)}; free some space or choose another location")


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


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
