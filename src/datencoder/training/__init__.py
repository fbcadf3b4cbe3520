"""Training machinery shared by encoder pre-training and the minisd stages: one loop, one
checkpoint format, one data order, one LR schedule."""

from .checkpoint import Checkpoint, find_checkpoint, load_ema_weights, read_checkpoint
from .loop import EMA, LoopConfig, LoopResult, check_resume, fit, make_accelerator
from .order import StreamOrder, mix, shard_positions
from .schedule import lr_factor

__all__ = ["fit", "LoopConfig", "LoopResult", "EMA", "check_resume", "make_accelerator", "load_ema_weights", "read_checkpoint", "find_checkpoint",
           "Checkpoint",
           "StreamOrder", "shard_positions", "mix", "lr_factor"]
