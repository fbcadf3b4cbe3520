"""The ``datencoder`` command: one sub-command per recipe module.

Each recipe module defines ``add_arguments(parser)`` and ``run(args) -> int``. A
``DatencoderError`` from anywhere is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import DatencoderError

# command name -> (recipe module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("datencoder.recipes.demo", "personalise a bundled emoji and write one grid PNG"),
    "pretrain": ("datencoder.recipes.pretrain", "pre-train the tuning encoder (accelerate)"),
    "personalize": ("datencoder.recipes.personalize", "encoder prediction + short tuning on one image"),
    "generate": ("datencoder.recipes.generate", "generate images of a concept from a prompt"),
    "export": ("datencoder.recipes.export", "export a concept for stock diffusers, AUTOMATIC1111 or ComfyUI"),
    "export-base": ("datencoder.recipes.export_base", "write a base model as a diffusers pipeline folder"),
    "app": ("datencoder.recipes.app", "a local web page to personalise and generate (needs the app extra)"),
    "evaluate": ("datencoder.recipes.evaluate", "evaluate methods on held-out concepts"),
    "data": ("datencoder.recipes.data", "build a training data set (emoji)"),
    "minisd": ("datencoder.recipes.minisd", "train a stage of the embedded default model"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The parser; only the chosen command's recipe module is imported (fast --help)."""
    parser = argparse.ArgumentParser(
        prog="datencoder",
        description="Fast one-image personalisation of text-to-image diffusion models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _load(module_name)
            if module is not None:
                module.add_arguments(p)
    return parser, module


def _quiet_libraries() -> None:
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # transformers logs through its own handler
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def default_threads(cores: int, load: float, torch_default: int) -> int:
    """CPU threads for torch: its default (one per physical core), but no more than the cores the
    other work on the machine leaves idle (1-minute load average), and at least one. On a busy
    machine extra threads only contend (the demo took 199.5 s with the default threads on a
    2-core machine busy with a training, 34.6 s with one)."""
    return max(1, min(torch_default, round(cores - load)))


def _set_threads() -> None:
    """Apply ``default_threads`` unless OMP_NUM_THREADS chooses (torch reads it itself)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = default_threads(cores, load, torch.get_num_threads())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logging.getLogger("datencoder").debug("%d CPU threads (%d cores, load %.1f; OMP_NUM_THREADS overrides)",
                                          threads, cores, load)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        _quiet_libraries()
    parser, module = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 1
    # key=value overrides may also follow the options (argparse stops a positional list at the
    # first option): collect them for the commands that take overrides
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [e for e in extra if "=" not in e or e.startswith("-")]
        if not stray:
            args.overrides += extra
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if module is None:
        print(f"error: 'datencoder {args.command}' is not available in this version yet", file=sys.stderr)
        return 2
    try:
        _set_threads()
        return int(module.run(args) or 0)
    except DatencoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
