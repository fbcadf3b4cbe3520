"""Resumable training checkpoints: tensors in safetensors, scalars and RNG states in JSON.

A checkpoint is ``<name>.safetensors`` (model, EMA and AdamW state tensors) plus
``<name>.json`` (step, data-order position, generator states as lists, optimizer
hyper-parameters). Both are written atomically and carry the same step, so a crash between the
two writes is detected instead of silently mixing two steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ...io import save_file_atomic, write_text_atomic
from ...errors import DatencoderError


def atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file_atomic(path, tensors, metadata)


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


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    opt, groups = optimizer_tensors(optimizer)
    tensors.update(opt)
    step = str(scalars["step"])
    atomic_save_tensors(tensors, directory / "checkpoint.safetensors", metadata={"step": step})
    atomic_write_text(directory / "checkpoint.json", json.dumps({**scalars, "optimizer_groups": groups}, indent=1))


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any]:
    """Restore tensors in place; return the JSON scalars."""
    json_path, st_path = directory / "checkpoint.json", directory / "checkpoint.safetensors"
    if not json_path.exists() or not st_path.exists():
        raise DatencoderError(f"no checkpoint in {directory}; run the stage without --resume first")
    scalars = json.loads(json_path.read_text())
    from safetensors import safe_open

    with safe_open(str(st_path), "pt") as f:
        if f.metadata().get("step") != str(scalars["step"]):
            raise DatencoderError(f"checkpoint in {directory} is inconsistent (tensors and JSON differ in step)")
    tensors = load_file(str(st_path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    if optimizer is not None:
        load_optimizer_tensors(optimizer, tensors, scalars["optimizer_groups"])
    return scalars


def load_ema_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint (what gets cached with and exported)."""
    path = directory / "checkpoint.safetensors"
    if not path.exists():
        raise DatencoderError(f"no checkpoint in {directory}; train that stage first")
    return {k[4:]: v for k, v in load_file(str(path)).items() if k.startswith("ema.")}
