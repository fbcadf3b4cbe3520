"""Copy a pre-trained encoder into the package as fp16 (how assets/minisd-emoji-encoder is made).

    python scripts/ship_encoder.py /work/runs/pretrain/minisd_encoder/encoder \
        src/datencoder/assets/minisd-emoji-encoder

Floating-point tensors are cast to float16 (half the size; ``EncoderSystem.load`` casts them back
into the fp32 model), ``encoder.json`` is copied with ``info.shipped_dtype`` set. Both files are
written atomically; the base fingerprint is kept, so the copy loads only with the same base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datencoder.io import load_tensors, read_json, save_tensors_atomic, write_json_atomic
from datencoder.system import KIND


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="folder with encoder.safetensors and encoder.json (train.output_dir/encoder)")
    p.add_argument("dest", help="folder to write, e.g. src/datencoder/assets/minisd-emoji-encoder")
    args = p.parse_args(argv)
    src, dst = Path(args.source), Path(args.dest)
    meta = read_json(src / f"{KIND}.json", KIND)
    state = load_tensors(src / f"{KIND}.safetensors", KIND)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dst.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(dst / f"{KIND}.safetensors", half, KIND)
    meta["info"] = {**meta.get("info", {}), "shipped_dtype": "float16"}
    write_json_atomic(dst / f"{KIND}.json", meta)
    size = (dst / f"{KIND}.safetensors").stat().st_size / 1e6
    print(f"wrote {dst} ({size:.1f} MB, base fingerprint {meta['base']['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
