"""The one resumable training loop: encoder pre-training and every minisd stage run through ``fit``.

The caller supplies the model (its trainable parameters are optimised), ``loss_fn(model, batch,
generator) -> dict of named terms`` (``"loss"`` is optimised when present, otherwise the sum of the
terms), ``batch_fn(example_indices, stream_positions) -> batch`` and a ``LoopConfig``. The loop owns
accelerate (one process, or ``accelerate launch`` / torchrun), AdamW, the warm-up schedule,
gradient accumulation and clipping, autocast, the optional EMA, the data order, checkpoints, the
log and the stop conditions (steps, ``max_steps`` per invocation, ``max_minutes`` of training
summed over resumes, a ``STOP`` file in the work dir). ``resume=True`` continues bit-identically.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DatencoderError
from ..io import write_text_atomic
from .checkpoint import (find_checkpoint, load_optimizer_tensors, optimizer_tensors, read_checkpoint, rng_state,
                         set_rng_state, write_checkpoint)
from .order import StreamOrder, mix, shard_positions
from .schedule import SCHEDULES, lr_factor

__all__ = ["LoopConfig", "LoopResult", "EMA", "fit", "check_resume", "make_accelerator"]

log = logging.getLogger(__name__)

PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class LoopConfig:
    work_dir: str
    steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0: none)."""
    mixed_precision: str = "no"
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this much training time, summed over resumes; 0: no limit."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none by step count); one is always written at the end."""
    checkpoint_minutes: float = 0.0
    """Minutes between checkpoints (0: none by time)."""
    sample_every: int = 0
    """Steps between calls of the sample hook (0: never)."""
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    """DataLoader worker processes calling ``batch_fn`` (0: in the training process)."""

    @classmethod
    def taken_from(cls, settings, **given) -> "LoopConfig":
        """The loop's settings from a training-config dataclass: its fields of the same names, then ``given``."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)}, **given)

    def __post_init__(self) -> None:
        at_least = {"steps": 0, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "checkpoint_every": 0,
                    "sample_every": 0, "log_every": 1, "num_workers": 0, "seed": 0}
        for key, low in at_least.items():
            if getattr(self, key) < low:
                raise DatencoderError(f"train.{key} must be >= {low}, got {getattr(self, key)}")
        for key in ("weight_decay", "max_grad_norm", "max_minutes", "checkpoint_minutes"):
            if not 0 <= getattr(self, key) < math.inf:  # NaN and infinity fail too
                raise DatencoderError(f"train.{key} must be >= 0 and finite, got {getattr(self, key)}")
        if not 0 < self.lr < math.inf:
            raise DatencoderError(f"train.lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise DatencoderError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in SCHEDULES:
            raise DatencoderError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise DatencoderError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


@dataclass
class LoopResult:
    step: int
    epoch: int
    steps_this_run: int
    seconds_per_step: float
    train_seconds: float
    final_loss: float
    """The loss of the last log row (mean over its window and the processes)."""
    last_terms: dict[str, float]
    is_main: bool


class EMA:
    """Exponential moving average of the floating-point state, with the usual warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Early on the average would be dominated by the random init; ramp the decay up.
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain copy of ``model`` carrying the EMA weights, in eval mode."""
        out = _plain(copy.deepcopy(model))
        out.load_state_dict(self.shadow, strict=False)
        return out.eval()


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the autocast wrapper accelerate installs on a prepared model's ``forward`` (in place)."""
    for name in ("forward", "_original_forward"):
        model.__dict__.pop(name, None)
    return model


_LAUNCH_HINT = ("on N GPUs use 'accelerate launch --multi_gpu --num_processes N', on CPUs "
                "'ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N' (docs/commands.md)")


def make_accelerator(cfg: LoopConfig, cpu: bool = False):
    """The Accelerator, refusing a launch whose processes would each train alone.

    ``accelerate launch --multi_gpu --num_processes N`` without N GPUs starts N processes that each
    see one process (WORLD_SIZE=N, num_processes=1): N independent trainings writing one folder.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # One process may train several stages in turn (tests, scripts) with different precisions;
    # accelerate keeps the first one's state otherwise. The distributed setup (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  cpu=cpu)
    except (ValueError, RuntimeError) as err:  # e.g. WORLD_SIZE set without MASTER_ADDR
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DatencoderError(f"could not start the distributed run ({line}); {_LAUNCH_HINT}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise DatencoderError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate runs each alone "
            f"(num_processes={accelerator.num_processes}, {accelerator.distributed_type.value}): they would train "
            f"independently into one output folder; {_LAUNCH_HINT}")
    return accelerator


def check_resume(work: str | Path, resume: bool) -> None:
    """Refuse, before any heavy work, to overwrite a checkpoint or to resume from none."""
    found = find_checkpoint(work)
    if not resume and found is not None:
        raise DatencoderError(f"{work} already holds a checkpoint; pass --resume to continue it "
                              "or choose a new output folder")
    if resume and found is None:
        raise DatencoderError(f"no checkpoint in {work}; run without --resume first")


class _Batches(torch.utils.data.Dataset):
    """Micro-batch of stream positions -> the caller's batch (runs in DataLoader workers when asked)."""

    def __init__(self, order: StreamOrder, batch_fn: Callable):
        self.order, self.batch_fn = order, batch_fn

    def __getitem__(self, positions: list[int]):
        return self.batch_fn(self.order.indices(positions), torch.tensor(positions, dtype=torch.long))


def _trim_log(path: Path, step: int) -> None:
    """After a resume, drop log rows written after the checkpoint (they are re-run)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(f"{r}\n" for r in rows))


def _agree(accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (time and files differ between processes)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any, torch.Generator], dict[str, torch.Tensor]],
        batch_fn: Callable[[torch.Tensor, torch.Tensor], Any], num_examples: int, cfg: LoopConfig, *,
        resume: bool = False, max_steps: int | None = None, cpu: bool = False,
        sample_fn: Callable[[torch.nn.Module, int], None] | None = None,
        log_columns: Callable[[], dict[str, float]] | None = None, meta: dict | None = None,
        accelerator=None) -> LoopResult:
    """Train ``model`` in place; returns the run's summary.

    ``sample_fn(model, step)`` gets the EMA copy (else the model, in eval mode) on the main process;
    ``log_columns()`` adds this process's extra columns to each log row; ``meta`` (e.g. the config)
    is stored in every checkpoint; ``accelerator`` one from ``make_accelerator(cfg)`` (made here if None).
    """
    from accelerate.utils import gather_object, set_seed

    out = Path(cfg.work_dir)
    check_resume(out, resume)
    if num_examples < 1:
        raise DatencoderError("no training examples")
    accelerator = accelerator or make_accelerator(cfg, cpu)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.lr_schedule))
    prepared, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(mix(cfg.seed, "noise", rank))
    set_seed(cfg.seed, device_specific=True)  # global RNGs (restored below on resume)
    step, position, train_seconds, loss_value = 0, 0, 0.0, float("nan")
    if resume:
        step, position, train_seconds, loss_value = _restore(accelerator, out, model, ema, optimizer, scheduler,
                                                             generator, num_examples, meta)
    per_step = cfg.batch_size * cfg.grad_accum * world
    order = StreamOrder(num_examples, cfg.seed)
    sampler = shard_positions(position, cfg.batch_size, cfg.grad_accum, world, rank)
    first = next(shard_positions(position, cfg.batch_size, cfg.grad_accum, world, rank))
    log.info("process %d/%d reads stream positions %s at step %d", rank, world, first, step + 1)
    # The loader gets its own generator: creating its iterator must not draw from the global RNG.
    loader = torch.utils.data.DataLoader(_Batches(order, batch_fn), batch_size=None, sampler=sampler,
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(mix(cfg.seed, "loader", rank)))
    batches = iter(loader)

    log_path = out / "log.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, step)
    stop = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    bar = tqdm(total=cfg.steps, initial=step, desc=out.name, mininterval=10, disable=not accelerator.is_local_main_process)
    start_step, last_ckpt = step, time.monotonic()
    window: dict = {"time": time.perf_counter(), "terms": {}, "n": 0}
    last_terms: dict[str, float] = {}
    grad_norm = None

    def unwrapped() -> torch.nn.Module:
        return accelerator.unwrap_model(prepared)

    def write_log() -> None:
        nonlocal loss_value, window
        names = sorted(window["terms"])
        means = torch.tensor([window["terms"][k] / window["n"] for k in names], device=accelerator.device)
        means = dict(zip(names, accelerator.reduce(means, "mean").tolist()))
        loss_value = means["loss"]
        now = time.perf_counter()
        row = {"step": step, "epoch": position // num_examples, "lr": scheduler.get_last_lr()[0], **means,
               **({"grad_norm": grad_norm} if grad_norm is not None else {}),
               "s_per_step": (now - window["time"]) / window["n"], "train_min": train_seconds / 60,
               **(log_columns() if log_columns is not None else {})}
        if is_main:
            with log_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        window = {"time": now, "terms": {}, "n": 0}

    def sample() -> None:
        if is_main and sample_fn is not None:
            if ema is not None:
                sample_fn(ema.copy_to(model), step)
            else:
                sample_fn(unwrapped().eval(), step)
                prepared.train()

    saved = {"step": step if resume else None}

    def diverged(what: str) -> DatencoderError:
        kept = (f"the last good checkpoint (step {saved['step']}) is kept in {out}" if saved["step"] is not None
                else "no checkpoint was written")
        return DatencoderError(f"training diverged: {what} at step {step + 1}; stopped, {kept}; "
                               f"lower train.lr (now {cfg.lr:g}) and resume or restart")

    def checkpoint() -> None:
        # a non-finite weight is never checkpointed as progress (every process agrees, then stops)
        state = unwrapped().state_dict()
        if _agree(accelerator, not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())):
            raise diverged("the weights became NaN or infinite")
        saved["step"] = step
        mine = rng_state(generator)
        ranks = gather_object([mine]) if world > 1 else [mine]
        if is_main:
            tensors = {f"model.{k}": v for k, v in unwrapped().state_dict().items()}
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
            opt, groups = optimizer_tensors(optimizer)
            tensors.update(opt)
            for r, (rng, _) in enumerate(ranks):
                tensors.update({f"rng.{r}.{k}": v for k, v in rng.items()})
            write_checkpoint(out, tensors, {
                **(meta or {}), "step": step, "position": position, "epoch": position // num_examples,
                "train_seconds": train_seconds, "loss": loss_value, "last_losses": last_terms,
                "num_processes": world, "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": [plain for _, plain in ranks]})
        accelerator.wait_for_everyone()

    prepared.train()
    while step < stop:
        over_time = cfg.max_minutes > 0 and train_seconds >= cfg.max_minutes * 60
        if _agree(accelerator, over_time or (out / "STOP").exists()):
            log.info("stopping at step %d: %s", step, "time budget reached" if over_time else "STOP file found")
            break
        t0 = time.perf_counter()
        terms_sum: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(prepared):
                with accelerator.autocast():
                    terms = loss_fn(prepared, batch, generator)
                loss = terms["loss"] if "loss" in terms else sum(terms.values())
                values = {name: float(value.detach()) for name, value in terms.items()}
                values.setdefault("loss", float(loss.detach()))
                if _agree(accelerator, not math.isfinite(values["loss"])):
                    raise diverged(f"the loss became {values['loss']}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in values.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value / cfg.grad_accum
        scheduler.step()
        if ema is not None:
            ema.update(unwrapped(), step)
        step += 1
        position += per_step
        train_seconds += time.perf_counter() - t0
        last_terms = terms_sum
        for name, value in terms_sum.items():
            window["terms"][name] = window["terms"].get(name, 0.0) + value
        window["n"] += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in terms_sum.items()})
        if step % cfg.log_every == 0 or step == stop:
            write_log()
        if cfg.sample_every and step % cfg.sample_every == 0:
            sample()
        due = cfg.checkpoint_minutes > 0 and time.monotonic() - last_ckpt >= cfg.checkpoint_minutes * 60
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or _agree(accelerator, due) or step == stop:
            checkpoint()
            last_ckpt = time.monotonic()
    bar.close()
    if window["n"]:  # stopped by time or STOP between log rows
        write_log()
    if step == start_step or (step < stop):  # nothing ran, or stopped early: the last checkpoint is older
        checkpoint()
    if cfg.sample_every and step % cfg.sample_every and step > start_step:
        sample()
    ran = step - start_step
    log.info("stopped at step %d after %.1f min of training; loss %.4f", step, train_seconds / 60, loss_value)
    _plain(model)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return LoopResult(step, position // num_examples, ran, train_seconds / max(1, ran), train_seconds, loss_value, last_terms, is_main)


def _restore(accelerator, out: Path, model, ema, optimizer, scheduler, generator, num_examples: int,
             meta: dict | None) -> tuple[int, int, float, float]:
    """Load the checkpoint of ``out`` into the run; returns (step, position, train seconds, loss)."""
    ckpt = read_checkpoint(out)
    saved = ckpt.meta
    if meta and "config" in meta and isinstance(saved.get("config"), dict):
        changed = [k for k in meta["config"] if k != "train" and saved["config"].get(k) != meta["config"][k]]
        if changed:
            log.warning("resuming with changed config sections %s: the run is no longer exactly reproducible", changed)
    model.load_state_dict(ckpt.prefixed("model."))
    if ema is not None:
        shadow = ckpt.averaged()
        for k in ema.shadow:
            ema.shadow[k].copy_(shadow[k])
    load_optimizer_tensors(optimizer, ckpt.tensors, saved["optimizer_groups"])
    step = saved["step"]
    if ckpt.legacy:
        position = saved["data_epoch"] * num_examples + saved["data_offset"]
        generator.set_state(torch.tensor(saved["noise_rng"], dtype=torch.uint8))
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler stepped before the optimizer": by design here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()  # the LR of step ``step``, as if stepped all along
        log.warning("converted the old checkpoint layout of %s at step %d: the data order continues from a new "
                    "stream (position %d), so this resume is not bit-identical to the old run", out, step, position)
        return step, position, float(saved.get("train_seconds", 0.0)), float("nan")
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    rank = accelerator.process_index
    if saved["num_processes"] != accelerator.num_processes:
        log.warning("checkpoint written by %d processes, resuming with %d: data order continues, noise differs",
                    saved["num_processes"], accelerator.num_processes)
    if rank < len(saved["rng"]):
        set_rng_state(generator, ckpt.prefixed(f"rng.{rank}."), saved["rng"][rank])
    log.info("resumed from %s at step %d (%.1f min trained)", out, step, saved["train_seconds"] / 60)
    return step, saved["position"], saved["train_seconds"], saved["loss"]
