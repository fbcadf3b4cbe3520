"""Command-line options shared by the recipes that run a model: device, precision, weight variant."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_device_arguments(parser: argparse.ArgumentParser, variant: bool = True) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES,
                        help="precision of the frozen base model (default fp32); tuned tensors stay fp32")
    if variant:
        parser.add_argument("--variant", default=None, metavar="NAME",
                            help="weight files to load, e.g. fp16 for *.fp16.safetensors "
                                 "(default: the plain weights, or the only variant a folder holds)")


def device_options(args: argparse.Namespace):
    """(torch.device, torch.dtype) from --device/--dtype; a missing CUDA is a one-line error."""
    from ..base import resolve_device, resolve_dtype

    return resolve_device(args.device), resolve_dtype(args.dtype)
