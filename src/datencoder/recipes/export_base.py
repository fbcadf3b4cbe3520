"""``datencoder export-base [BASE] --out DIR``: a base model as a complete diffusers pipeline folder.

For bases that borrow parts from a Python package (the embedded ``minisd-emoji`` borrows its
MiniLM text encoder): the folder holds every part, so stock ``StableDiffusionPipeline.from_pretrained``
loads it as is. See ``datencoder.export_base``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", nargs="?", default="minisd-emoji", metavar="BASE",
                        help="base model name or folder (default: minisd-emoji)")
    parser.add_argument("--out", required=True, help="output folder (new or empty; written whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export-base folder in --out")


def run(args: argparse.Namespace) -> int:
    from ..base import load_base
    from ..export_base import check_export_dir, export_base, pipeline_bytes
    from ..io import check_free_space, claim_output

    with claim_output(args.out):  # writable (a read-only folder is one line), and ours alone
        check_export_dir(args.out, args.overwrite)  # before loading anything
        base = load_base(args.base, with_image_tower=False)
        check_free_space(args.out, pipeline_bytes(base))
        out = export_base(base, args.out, overwrite=args.overwrite)
    print(f"wrote base model {args.base} (fingerprint {base.fingerprint}) to {out}")
    print(f"load it with StableDiffusionPipeline.from_pretrained({str(out)!r}); see {out / 'README.txt'}")
    return 0
