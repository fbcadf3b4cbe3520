"""The one checkpoint format of every training run, and the reader of the older minisd format.

``<work>/checkpoint/`` holds ``checkpoint.safetensors`` (``model.*``, ``ema.*``, AdamW state
``optim.<param>.<key>`` and each process's RNG tensors ``rng.<rank>.*``) and ``checkpoint.json``
(step, stream position, train seconds, LR-scheduler state, plain RNG states, the caller's extra
values such as the config). The folder is written beside the old one and swapped in
(``io.atomic_dir``); a crash between the swap's two renames leaves ``.checkpoint.old``, which
is read instead.

Legacy: minisd stages once wrote ``<work>/checkpoint.json`` + ``<work>/checkpoint.safetensors``
(scalars ``data_epoch``/``data_offset``/``noise_rng``, no RNG tensors); ``read_checkpoint``
converts them on load.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DatencoderError
from ..io import atomic_dir, load_tensors, read_json, save_tensors_atomic, write_json_atomic

__all__ = ["KIND", "Checkpoint", "find_checkpoint", "read_checkpoint", "write_checkpoint", "load_ema_weights",
           "optimizer_tensors", "load_optimizer_tensors", "rng_state", "set_rng_state"]

KIND = "training_checkpoint"
FOLDERS = ("checkpoint", ".checkpoint.old")  # .old survives a crash between the swap's renames


@dataclass
class Checkpoint:
    meta: dict
    tensors: dict[str, torch.Tensor]
    legacy: bool = False
    """Written by the old minisd loop: ``meta`` holds ``data_epoch``/``data_offset``, no RNG tensors."""

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def averaged(self) -> dict[str, torch.Tensor]:
        """The EMA weights, or the model's when the run kept no average."""
        return self.prefixed("ema.") or self.prefixed("model.")


# -- optimizer and RNG state as tensors + plain values -----------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as flat tensors ``optim.<param index>.<key>`` plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG state of this process: tensors (safetensors) and plain values (JSON)."""
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    version, py_state, gauss = random.getstate()
    plain = {"python": [version, list(py_state), gauss], "numpy": [np_state[0], *map(_plain, np_state[2:])]}
    return tensors, plain


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def set_rng_state(generator: torch.Generator, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, py_state, gauss = plain["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# -- folder ------------------------------------------------------------------------------------
def write_checkpoint(work: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``<work>/checkpoint/`` whole, replacing the previous one in one swap."""
    with atomic_dir(Path(work) / "checkpoint") as tmp:
        save_tensors_atomic(tmp / "checkpoint.safetensors", tensors, KIND, {"step": str(meta["step"])})
        write_json_atomic(tmp / "checkpoint.json", {**meta, "kind": KIND})


def find_checkpoint(work: str | Path) -> Path | None:
    """The checkpoint folder of a work dir (``work`` itself for the legacy layout), or None."""
    work = Path(work)
    for name in FOLDERS:
        if (work / name / "checkpoint.json").is_file():
            return work / name
    if (work / "checkpoint.json").is_file() and (work / "checkpoint.safetensors").is_file():
        return work
    return None


def read_checkpoint(work: str | Path) -> Checkpoint:
    """The checkpoint of ``work`` (current or legacy layout), or a one-line error."""
    folder = find_checkpoint(work)
    if folder is None:
        raise DatencoderError(f"no checkpoint in {work}; train without --resume first")
    if folder != Path(work):
        return Checkpoint(read_json(folder / "checkpoint.json", KIND),
                          load_tensors(folder / "checkpoint.safetensors", KIND))
    return _read_legacy(folder)


def _read_legacy(folder: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = json.loads((folder / "checkpoint.json").read_text())
    path = folder / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("step") != str(meta.get("step")):
            raise DatencoderError(f"checkpoint in {folder} is inconsistent (tensors and JSON differ in step)")
    return Checkpoint(meta, load_file(str(path)), legacy=True)


def load_ema_weights(work: str | Path) -> dict[str, torch.Tensor]:
    """The averaged weights of a run (its model weights when it kept no EMA): what gets cached and
    exported. Reads both checkpoint layouts."""
    if find_checkpoint(work) is None:
        raise DatencoderError(f"no checkpoint in {work}; train that stage first")
    return read_checkpoint(work).averaged()
