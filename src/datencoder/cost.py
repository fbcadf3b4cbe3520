"""The cost of a phase of work: seconds and peak memory, measured one way for every method.

METHOD.md, "Metrics": the time and peak memory of personalisation, per method. Every row of the
evaluation (ours, Textual Inversion, DreamBooth-LoRA, whole-UNet DreamBooth, E4T) is measured by
``measure``, on the device the work runs on:

- CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) after
  ``reset_peak_memory_stats``; the device is synchronised before each clock read, so queued
  kernels are counted in the phase that launched them.
- CPU: the process's resident-set high-water mark (VmHWM), reset at the start of the phase by
  writing "5" to /proc/self/clear_refs (Linux). Where that is not allowed the peak is the
  process's maximum so far (``ru_maxrss``), an upper bound of the phase's, and ``Cost.peak_of``
  says so.

Phases nest: an inner phase's reset would hide what the enclosing one used before it, so the
enclosing phases take the peak read just before that reset into account.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Cost", "measure", "peak_memory_mb", "cost_info"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Cost:
    seconds: float = 0.0
    peak_mb: float = 0.0
    peak_of: str = ""
    """What ``peak_mb`` is: 'cuda allocator', 'rss' (VmHWM reset per phase) or 'rss, process maximum'
    (no reset allowed here)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> str:
    """Start a new peak; returns what the peak read will be."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda allocator"
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM (Linux >= 4.0)
        return "rss"
    except OSError:
        return "rss, process maximum"


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """The peak since the last reset: CUDA allocator peak, or the process's VmHWM (ru_maxrss off Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


_OPEN: list[tuple[torch.device, Cost]] = []
"""Phases being measured, outermost first (see the module docstring on nesting)."""


@contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Cost]:
    """Measure the block as one phase on ``device``; the yielded ``Cost`` is filled when it ends."""
    device = torch.device(device)
    cost = Cost()
    _sync(device)
    for outer_device, outer in _OPEN:
        if outer_device == device:  # this phase's reset would drop what the enclosing one has used
            outer.peak_mb = max(outer.peak_mb, peak_memory_mb(device))
    cost.peak_of = _reset_peak(device)
    _OPEN.append((device, cost))
    start = time.perf_counter()
    try:
        yield cost
    finally:
        _sync(device)
        cost.seconds = time.perf_counter() - start
        cost.peak_mb = max(cost.peak_mb, peak_memory_mb(device))
        del _OPEN[next(i for i, (_, c) in enumerate(_OPEN) if c is cost)]


def cost_info(encoder: Cost | None, tuning: Cost) -> dict:
    """A concept's cost fields (``Concept.info``), the same for every method: encoder_s (0 without
    an encoder), tuning_s, peak_memory_mb (the larger phase's peak) and peak_of."""
    phases = [c for c in (encoder, tuning) if c is not None]
    return {"encoder_s": round(encoder.seconds if encoder else 0.0, 4), "tuning_s": round(tuning.seconds, 4),
            "peak_memory_mb": round(max(c.peak_mb for c in phases), 1), "peak_of": tuning.peak_of}
