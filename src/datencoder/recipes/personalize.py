"""``datencoder personalize IMAGE [key=value ...] [--encoder DIR] --out CONCEPT_DIR [--overwrite]``.

Setup (image, encoder, base), the encoder's prediction plus a short tuning on the one image
(``datencoder.tuning.personalize``), then the concept artifact written atomically. Prints the
time of each phase, the peak memory and the nearest real word of the learned embedding.
``key=value`` overrides (``tune.lr_lora=3e-3``, written right after IMAGE, like the other
commands' positionals) apply to the encoder's saved config.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import add_device_arguments, device_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the one image of the concept (PNG, JPEG, WebP)")
    parser.add_argument("--encoder", default="minisd-emoji-encoder", metavar="DIR_OR_NAME",
                        help="folder of a pre-trained encoder, or the shipped minisd-emoji-encoder (default)")
    parser.add_argument("--out", required=True, metavar="CONCEPT_DIR", help="folder to write the concept to")
    parser.add_argument("--overwrite", action="store_true", help="replace a concept already in --out")
    parser.add_argument("--steps", type=int, default=None,
                        help="tuning steps (default: the encoder's tune.steps, 12); 0 = encoder prediction only")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise and augmentations (default 0)")
    parser.add_argument("--base", default=None, metavar="PATH_OR_ID",
                        help="base model (default: the one the encoder was trained on)")
    parser.add_argument("--no-dual-path", action="store_true", help="tune single path (a = 1)")
    add_device_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the encoder's config, right after IMAGE, e.g. tune.lr_lora=3e-3")


def _overrides(args: argparse.Namespace) -> dict:
    """Command-line overrides as {section: {key: value}}, validated against Config up front."""
    from ..config import Config, apply_overrides, from_dict
    from ..errors import DatencoderError

    data = apply_overrides({}, args.overrides)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise DatencoderError(f"override '{section}=...' must name a section and a key, e.g. tune.steps=4")
    tune = data.setdefault("tune", {})
    tune["seed"] = args.seed
    if args.steps is not None:
        tune["steps"] = args.steps
    if args.no_dual_path:
        data.setdefault("dual_path", {})["enabled"] = False
    if args.variant is not None:
        data.setdefault("model", {})["variant"] = args.variant
    from_dict(Config, data)  # unknown keys, wrong types, --steps -1, --seed 2**63: one-line errors up front
    return data


def _check_out(args: argparse.Namespace) -> None:
    """--out must be writable and hold nothing but a concept; an existing concept (or the one a
    stopped --overwrite left at .<out>.old) is replaced only on request."""
    from ..concept import FILES
    from ..errors import DatencoderError
    from ..io import artifact_dir, check_output, check_replaceable

    out = check_output(args.out)
    check_replaceable(out, FILES, "concept")  # the folder is replaced whole
    held = artifact_dir(out)
    if not args.overwrite and any((held / name).exists() for name in FILES):
        raise DatencoderError(f"{out} already holds a concept; pass --overwrite to replace it or choose another --out")


def _concept_bytes(system) -> int:
    """Size of the concept file this system writes: the embedding and the offsets' factors (fp32)."""
    from ..attention import target_layer_shapes

    enc = system.cfg.encoder
    shapes = target_layer_shapes(system.base.unet, enc.targets, enc.attention_kinds)
    return 4 * (sum(system.base.token_dims) + sum(enc.rank * (i + o) for i, o in shapes.values())) + 65536


def run(args: argparse.Namespace) -> int:
    from ..io import claim_output

    overrides = _overrides(args)
    with claim_output(args.out):  # a second run on this --out fails now, not after both "succeed"
        return _run(args, overrides)


def _run(args: argparse.Namespace, overrides: dict) -> int:
    from tqdm.auto import tqdm

    from ..base import load_base
    from ..io import check_free_space, read_json
    from ..image_io import image_to_tensor, load_image
    from ..system import EncoderSystem, resolve_encoder
    from ..tuning import personalize

    _check_out(args)
    device, dtype = device_options(args)
    t0 = time.perf_counter()
    image = load_image(args.image, warn=True)
    encoder_dir = resolve_encoder(args.encoder)
    base = None
    if args.base is not None:
        tower = read_json(encoder_dir / "encoder.json", "encoder").get("config", {}).get("model", {}).get("image_tower")
        base = load_base(args.base, tower, torch_dtype=dtype, device=device, variant=args.variant)
    system = EncoderSystem.load(encoder_dir, base, overrides, device=device, dtype=dtype)
    check_free_space(args.out, _concept_bytes(system))  # before the tuning, not at the write
    pixels = image_to_tensor(image, system.base.resolution)  # [3, H, W] in [-1, 1]
    load_s = time.perf_counter() - t0

    steps = system.cfg.tune.steps
    with tqdm(total=steps, desc="tuning", unit="step", disable=steps == 0) as bar:
        def on_step(step: int, terms: dict[str, float]) -> None:
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            bar.update(1)

        concept = personalize(system, pixels, callback=on_step,
                              info={"image": str(Path(args.image).resolve()), "encoder": str(encoder_dir.resolve())})
    t1 = time.perf_counter()
    concept.save(args.out)
    save_s = time.perf_counter() - t1

    info = concept.info
    print(f"load      {load_s:7.2f} s  (image, base model '{system.base.name}' on {device} in {args.dtype}, encoder)")
    print(f"encoder   {info['encoder_s']:7.2f} s  (prediction)")
    print(f"tuning    {info['tuning_s']:7.2f} s  ({steps} steps, dual path {'on' if system.cfg.dual_path.enabled else 'off'})")
    print(f"save      {save_s:7.2f} s")
    print(f"peak memory {info['peak_memory_mb']:.0f} MB")
    print(f"nearest word: {concept.hard_word!r}")
    print(f"concept written to {args.out}; try: datencoder generate {args.out} \"{concept.placeholder} on the beach\"")
    return 0
