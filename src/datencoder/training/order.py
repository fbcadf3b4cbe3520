"""The data order: a global stream of positions k = 0, 1, 2, ..., each a pure function of (seed, k).

Position k is example ``perm(seed, epoch = k // N)[k % N]``: every epoch visits every example once
in a fresh order, and a resume only needs the position. Several processes split each optimizer
step's positions into disjoint slices (``shard_positions``), so the union of what they read is the
single-process stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

__all__ = ["mix", "StreamOrder", "shard_positions"]


def mix(*parts) -> int:
    """A 63-bit seed from several values (distinct streams never share a seed)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StreamOrder:
    """Stream position k -> example index; caches the permutation of the current epoch."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix(self.seed, "order", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def index(self, k: int) -> int:
        return int(self.permutation(k // self.n)[k % self.n])

    def indices(self, positions: list[int]) -> torch.Tensor:
        return torch.tensor([self.index(k) for k in positions], dtype=torch.long)


def shard_positions(start: int, batch: int, accum: int = 1, world: int = 1, rank: int = 0) -> Iterator[list[int]]:
    """This process's micro-batches of stream positions, from global position ``start`` on.

    One optimizer step consumes ``batch * accum * world`` positions: micro-batch m of rank r is
    the slice starting at ``(m * world + r) * batch`` within the step's block.
    """
    per_step = batch * accum * world
    step = 0
    while True:
        block = start + step * per_step
        for micro in range(accum):
            first = block + (micro * world + rank) * batch
            yield list(range(first, first + batch))
        step += 1
