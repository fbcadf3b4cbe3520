"""``datencoder export CONCEPT_DIR --format diffusers|kohya --out DIR``: a concept for other tools.

``diffusers`` writes a single-path LoRA (diffusers ``save_lora_weights`` format) and a
textual-inversion embedding; ``kohya`` writes the LoRA in the kohya key layout and the embedding in
the A1111 layout (AUTOMATIC1111, ComfyUI). Both add README.txt with the loading code. See
``datencoder.export`` and ``datencoder.export_kohya``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("concept", metavar="CONCEPT_DIR", help="folder written by 'datencoder personalize'")
    parser.add_argument("--format", default="diffusers", help="diffusers (stock diffusers) or kohya (AUTOMATIC1111 / ComfyUI); default: diffusers")
    parser.add_argument("--out", required=True, help="output folder (new or empty; written whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")


def run(args: argparse.Namespace) -> int:
    from ..concept import Concept
    from ..export import FORMATS, export_concept, export_size
    from ..errors import DatencoderError
    from ..io import check_free_space, claim_output

    if args.format not in FORMATS:  # fail before reading anything
        raise DatencoderError(f"unknown export format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    with claim_output(args.out):  # writable (a read-only folder is one line), and ours alone
        concept = Concept.load(args.concept)
        check_free_space(args.out, export_size(concept))
        out = export_concept(concept, args.out, args.format, overwrite=args.overwrite)
    print(f"exported {args.concept} ({len(concept.factors)} LoRA layers, token {concept.token}) to {out}")
    print(f"load it as shown in {out / 'README.txt'} (single path: dual path is not exported)")
    return 0
