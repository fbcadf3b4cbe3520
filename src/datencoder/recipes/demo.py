"""`datencoder demo`: personalise a bundled held-out emoji on the embedded default, one grid PNG.

Rows: the encoder-only concept (0 tuning steps) and the tuned one; columns: the input image and
prompts that move the concept to other backgrounds, positions and sizes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..errors import DatencoderError
from ..image_io import image_format, image_to_tensor, load_image, make_grid, save_image_atomic
from ..pipeline import ConceptPipeline, progress_callback
from ..io import check_output
from ..config import TUNE_STEPS_MAX, check_seed
from ..system import DEFAULT_ENCODER, EncoderSystem, encoder_path
from ..cost import measure
from ..tuning import personalize
from .options import add_device_arguments, device_options
from ..io import ASSETS

log = logging.getLogger("datencoder.demo")

DEMO_DIR = ASSETS / "demo"
PROMPTS = [
    "S*",
    "S*, on a blue background",
    "S*, on a yellow background",
    "S*, small, top left",
    "S*, large, center",
    "S*, small, bottom right, on a green background",
    "S*, medium, left, on a pink background",
]


def add_arguments(parser) -> None:
    names = sorted(p.stem for p in DEMO_DIR.glob("*.png"))
    parser.add_argument("--image", default="red_apple",
                        help=f"your own image, or a bundled one: {', '.join(names)} (default red_apple)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help=f"encoder folder, or the shipped {DEFAULT_ENCODER} (default)")
    parser.add_argument("--steps", type=int, default=12, help="tuning steps (default 12)")
    parser.add_argument("--sample-steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo.png", help="grid PNG to write (default demo.png)")
    add_device_arguments(parser, variant=False)


def _resolve_image(name: str) -> Path:
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    bundled = DEMO_DIR / f"{name}.png"
    if not bundled.exists():
        raise DatencoderError(f"no bundled demo image {name!r}; pass a file path with --image")
    return bundled


def run(args) -> int:
    # every argument is checked here, before the model is loaded or anything computed
    if not 0 <= args.steps <= TUNE_STEPS_MAX:
        raise DatencoderError(f"--steps must be in [0, {TUNE_STEPS_MAX}], got {args.steps}")
    if not 1 <= args.sample_steps <= 1000:
        raise DatencoderError(f"--sample-steps must be in [1, 1000], got {args.sample_steps}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise DatencoderError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    check_seed(args.seed, "--seed")
    check_output(args.out, folder=False)
    image_format(args.out, "--out")
    encoder_dir = encoder_path(args.encoder)  # a shipped encoder's name, or a folder
    if not (encoder_dir / "encoder.json").exists():
        raise DatencoderError(
            f"no encoder at {encoder_dir}: the embedded encoder is not installed in this version; "
            "train one with 'datencoder pretrain configs/minisd_encoder.yaml' and pass --encoder OUTPUT/encoder")
    device, dtype = device_options(args)
    with measure(device) as whole:  # loading included; nested phases keep its peak (cost.py)
        timings = {}
        start = time.perf_counter()
        image = load_image(_resolve_image(args.image), warn=True)
        system = EncoderSystem.load(encoder_dir, device=device, dtype=dtype)
        system.cfg.tune.seed = args.seed
        pixels = image_to_tensor(image, system.base.resolution)
        timings["load"] = time.perf_counter() - start

        t = time.perf_counter()
        system.cfg.tune.steps = 0
        encoder_only = personalize(system, pixels)
        timings["encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        system.cfg.tune.steps = args.steps
        bar = tqdm(total=args.steps, desc="tuning", unit="step", leave=False)
        tuned = personalize(system, pixels, callback=lambda step, terms: (bar.update(1), bar.set_postfix(loss=f"{terms['loss']:.3f}")))
        bar.close()
        timings["encoder+tuning"] = timings["encoder"] + time.perf_counter() - t

        t = time.perf_counter()
        rows = []
        for label, concept in (("encoder only", encoder_only), (f"tuned {args.steps} steps", tuned)):
            pipe = ConceptPipeline(system.base, concept)
            bar = tqdm(total=args.sample_steps, desc=f"sampling ({label})", unit="step", leave=False)
            images = pipe(PROMPTS, num_images_per_prompt=1, num_inference_steps=args.sample_steps,
                          guidance_scale=args.guidance, seed=args.seed,
                          callback_on_step_end=progress_callback(bar)).images
            bar.close()
            rows.append((label, images))
        timings["generation"] = time.perf_counter() - t

        side = max(160, system.base.resolution)  # small models: enlarge tiles so the labels fit
        tiles, labels = [], []
        for label, images in rows:
            tiles += [im.resize((side, side), Image.Resampling.BICUBIC) for im in [image, *images]]
            labels += [f"input ({label})", *PROMPTS]
        grid = make_grid(tiles, cols=len(PROMPTS) + 1, labels=labels)
        save_image_atomic(grid, args.out)
        timings["total"] = time.perf_counter() - start
    print(f"nearest word: {encoder_only.hard_word!r} (encoder) -> {tuned.hard_word!r} (tuned)")
    print("  ".join(f"{k} {v:.1f}s" for k, v in timings.items()) + f"  peak memory {whole.peak_mb:.0f} MB")
    print(f"wrote {args.out}")
    return 0
