"""``datencoder generate [CONCEPT_DIR] PROMPT [--out DIR ...]``: images of a concept, or of the base.

With a concept folder the prompt must contain its placeholder (S*) and the base model is the one
recorded in the concept (or ``--base``); with a prompt only it is plain generation on the base
model (default: the embedded ``minisd-emoji``). Writes ``000.png``, ``001.png``, ... batch by batch
(``--batch-size``), a labelled ``grid.png`` of the first 64, and ``generation.json`` with the exact
settings, all atomically. A rerun into the same ``--out`` first removes the files of the earlier
run (only those: ``NNN.png``, ``grid.png``, ``generation.json``); a folder holding such files
without a ``generation.json`` is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import DatencoderError
from .options import add_device_arguments, device_options

DEFAULT_BASE = "minisd-emoji"
_SAMPLE = "default: the concept's"
MAX_IMAGES = 10000
MAX_BATCH = 64
MAX_LORA_SCALE = 2.0
"""Stated limits of generate's flags (checked before anything is loaded)."""
SAMPLE_FLAGS = ("steps", "guidance", "num_images", "seed", "scheduler", "negative_prompt", "height", "width")
"""SampleConfig fields that a flag of the same name (--num-images: num_images) overrides."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="[CONCEPT_DIR] PROMPT",
                        help="an optional concept folder, then the prompt (quote it)")
    parser.add_argument("--base", default=None, metavar="PATH_OR_ID",
                        help=f"base model (default: the concept's, or {DEFAULT_BASE} without a concept)")
    # Sampling flags default to None: unset, they take the concept's ``sample`` config (the
    # SampleConfig defaults without a concept); given, they override it.
    parser.add_argument("--num-images", type=int, default=None, help=f"images to generate ({_SAMPLE}; 4 without a concept; at most {MAX_IMAGES})")
    parser.add_argument("--batch-size", type=int, default=4,
                        help=f"images sampled at once (default 4, at most {MAX_BATCH}); each batch is written as soon as it is done")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of the initial noise ({_SAMPLE}; 0 without a concept)")
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps ({_SAMPLE}; 25 without a concept)")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance scale, >= 0 ({_SAMPLE}; 7.5 without a concept)")
    parser.add_argument("--scheduler", default=None, help=f"ddim, dpm or euler ({_SAMPLE}; ddim without a concept)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default ./outputs/<prompt slug>, with -2, -3, ... when that one is taken)")
    parser.add_argument("--no-dual-path", action="store_true", help="sample single path (a = 1)")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="what the images should not show (classifier-free guidance's unconditional prompt; "
                             f"{_SAMPLE}; empty without a concept)")
    parser.add_argument("--height", type=int, default=None,
                        help=f"image height in pixels ({_SAMPLE}; else the base's resolution; at most 4x it)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"image width in pixels ({_SAMPLE}; else the base's resolution; at most 4x it)")
    parser.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                        help=f"multiplies the concept's offset scale, in [0, {MAX_LORA_SCALE:g}] (default 1; 0 = embedding only)")
    add_device_arguments(parser)


def slug(text: str, limit: int = 60) -> str:
    """Lowercase, filesystem-safe name for a prompt: 'S* on the beach!' -> 's-on-the-beach'."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:limit].rstrip("-") or "prompt"


GRID_MAX = 64
"""grid.png shows at most the first 64 images (all of them stay in memory until it is drawn)."""
_OURS = re.compile(r"^(\d{3,}\.png|grid\.png|generation\.json)$")


def _previous_outputs(out: Path) -> list[Path]:
    """Files an earlier ``generate`` wrote in ``out`` (removed before writing, so no stale image
    stays beside new ones); image-like files there without its generation.json are refused."""
    if not out.is_dir():
        return []
    ours = [p for p in out.iterdir() if p.is_file() and _OURS.match(p.name)]
    if ours and not (out / "generation.json").is_file():
        raise DatencoderError(f"{out} holds {ours[0].name} not written by 'datencoder generate'; "
                              "choose another --out")
    return ours


def _split_inputs(inputs: list[str]) -> tuple[str | None, str]:
    if len(inputs) > 2:
        raise DatencoderError(f"expected [CONCEPT_DIR] PROMPT, got {len(inputs)} words; quote the prompt")
    concept_dir, prompt = (None, inputs[0]) if len(inputs) == 1 else inputs
    if concept_dir is None and (Path(prompt) / "concept.json").is_file():  # the prompt was forgotten
        raise DatencoderError(f"{prompt} is a concept folder, but no prompt follows it; write e.g. "
                              f"datencoder generate {prompt} \"a photo of S*\"")
    if not prompt.strip():
        raise DatencoderError("the prompt is empty; describe the image, e.g. \"a photo of S* on the beach\"")
    if concept_dir is None and "S*" in prompt:
        raise DatencoderError(f"the prompt {prompt!r} uses the placeholder S* but no concept folder was given; "
                              "put the concept folder before the prompt")
    return concept_dir, prompt


def _check_flags(args: argparse.Namespace) -> None:
    """The flags the user gave, each against its stated limit, before anything is loaded."""
    from ..config import check_seed
    from ..pipeline import SCHEDULERS

    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise DatencoderError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if any(v is not None and v < 1 for v in (args.num_images, args.steps, args.batch_size)):
        raise DatencoderError("--num-images, --steps and --batch-size must be at least 1")
    if args.num_images is not None and args.num_images > MAX_IMAGES:
        raise DatencoderError(f"--num-images must be at most {MAX_IMAGES}, got {args.num_images}")
    if args.batch_size > MAX_BATCH:
        raise DatencoderError(f"--batch-size must be at most {MAX_BATCH}, got {args.batch_size}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise DatencoderError(f"--guidance must be a finite number >= 0 (1 = no guidance), got {args.guidance}")
    if not (math.isfinite(args.lora_scale) and 0 <= args.lora_scale <= MAX_LORA_SCALE):
        raise DatencoderError(f"--lora-scale must be in [0, {MAX_LORA_SCALE:g}] (1 = as tuned, 0 = embedding only), "
                              f"got {args.lora_scale}")
    if args.seed is not None:
        check_seed(args.seed, "--seed")


@contextlib.contextmanager
def _claim_out(args: argparse.Namespace, prompt: str) -> Iterator[Path]:
    """The output folder, held for this run (``io.claim_output``). Without --out it is the first of
    outputs/<slug>, outputs/<slug>-2, ... that is free and empty: another run's images are never
    replaced. A given --out is the user's choice: an earlier generate's files there are replaced."""
    from ..io import OutputBusy, claim_output

    if args.out:
        with claim_output(args.out) as out:
            yield out
        return
    for n in range(1, 10000):
        candidate = Path("outputs") / (slug(prompt) + (f"-{n}" if n > 1 else ""))
        if _taken(candidate):
            continue
        with contextlib.ExitStack() as stack:
            try:
                out = stack.enter_context(claim_output(candidate))
            except OutputBusy:  # another run holds it right now
                continue
            if _taken(out):  # filled while we looked
                continue
            yield out
            return
    raise DatencoderError(f"no free folder outputs/{slug(prompt)}-N; pass --out")


def _taken(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def sample_settings(args: argparse.Namespace, concept_config: dict | None):
    """The concept's ``sample`` config (SampleConfig defaults without a concept) with every flag
    the user gave written over it; validated again as a whole."""
    import dataclasses

    from ..config import SampleConfig, from_dict

    sample = from_dict(SampleConfig, (concept_config or {}).get("sample"))
    given = {name: getattr(args, name) for name in SAMPLE_FLAGS if getattr(args, name) is not None}
    return dataclasses.replace(sample, **given)


def run(args: argparse.Namespace) -> int:
    concept_dir, prompt = _split_inputs(args.inputs)
    _check_flags(args)  # flags given are checked now, before anything is loaded; the merged settings below
    with _claim_out(args, prompt) as out:
        return _run(args, concept_dir, prompt, out)


def _run(args: argparse.Namespace, concept_dir: str | None, prompt: str, out: Path) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..base import load_base
    from ..io import write_json_atomic
    from ..concept import Concept
    from ..image_io import make_grid, save_image_atomic
    from ..pipeline import ConceptPipeline, progress_callback

    stale = _previous_outputs(out)
    concept = None
    if concept_dir is not None:
        concept = Concept.load(concept_dir)
        if concept.placeholder not in prompt:
            raise DatencoderError(f"the prompt {prompt!r} does not contain the concept's placeholder "
                                  f"{concept.placeholder}; write e.g. \"a photo of {concept.placeholder}\"")
    sample = sample_settings(args, concept.config if concept is not None else None)
    device, dtype = device_options(args)
    base_name = args.base or (concept.base.get("name") if concept is not None else None) or DEFAULT_BASE
    variant = args.variant or (concept.config.get("model", {}).get("variant") if concept is not None else None)
    t0 = time.perf_counter()
    base = load_base(base_name, with_image_tower=False, torch_dtype=dtype, device=device, variant=variant)
    pipe = ConceptPipeline(base, concept, sample.scheduler)  # refuses a concept made for another base
    # --steps 5000, 100000 x 100000 pixels, a cut S*: refused before any sampling (one batch at a time)
    pipe.check(prompt, min(sample.num_images, args.batch_size), sample.steps, sample.guidance, sample.seed,
               sample.height, sample.width, args.lora_scale)
    height, width = pipe.check_size(sample.height, sample.width)
    load_s = time.perf_counter() - t0

    for path in stale:
        path.unlink()
    settings = {
        "prompt": prompt, "concept": concept_dir, "base": {"name": base.name, "fingerprint": base.fingerprint},
        "num_images": sample.num_images, "seed": sample.seed, "steps": sample.steps, "guidance": sample.guidance,
        "scheduler": sample.scheduler, "dual_path": concept is not None and not args.no_dual_path,
        "negative_prompt": sample.negative_prompt, "height": height, "width": width,
        "lora_scale": args.lora_scale, "device": str(device), "dtype": args.dtype, "variant": variant,
    }
    write_json_atomic(out / "generation.json", {**settings, "complete": False})  # marks the folder as ours
    # One generator for all batches: the noise stream continues, so the images do not depend on
    # --batch-size beyond float rounding (CPU draws; tests/test_edges.py).
    generator = torch.Generator().manual_seed(sample.seed)
    grid_images = []
    t1 = time.perf_counter()
    with tqdm(total=sample.steps * math.ceil(sample.num_images / args.batch_size), desc="sampling", unit="step") as bar:
        for first in range(0, sample.num_images, args.batch_size):
            count = min(args.batch_size, sample.num_images - first)
            images = pipe(prompt, num_images_per_prompt=count, num_inference_steps=sample.steps,
                          guidance_scale=sample.guidance, seed=None, generator=generator,
                          dual_path=not args.no_dual_path, negative_prompt=sample.negative_prompt, height=height,
                          width=width, lora_scale=args.lora_scale, callback_on_step_end=progress_callback(bar)).images
            for i, image in enumerate(images, first):
                save_image_atomic(image, out / f"{i:03d}.png")
            grid_images += images[: max(0, GRID_MAX - len(grid_images))]
    sample_s = time.perf_counter() - t1

    labels = [f"{i:03d}" for i in range(len(grid_images))]  # = the file names; settings in generation.json
    cols = math.ceil(math.sqrt(len(grid_images)))
    save_image_atomic(make_grid(grid_images, cols=cols, labels=labels), out / "grid.png")
    write_json_atomic(out / "generation.json", {**settings, "complete": True})
    print(f"load {load_s:.2f} s, sampling {sample_s:.2f} s ({sample.steps} steps x {sample.num_images} images)")
    print(f"wrote {sample.num_images} images and grid.png to {out}")
    return 0
