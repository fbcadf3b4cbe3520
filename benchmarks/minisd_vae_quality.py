"""How much of an emoji survives the autoencoder: PSNR and the evaluator's concept accuracy
on real composites versus their VAE reconstructions (issue: reconstructions >= 85 % of originals).

The images are the evaluator's own validation compositions (composition index 3 of each
concept-style, never trained on by the evaluator) of held-in concepts in the given styles,
spread evenly over the manifest.

    python benchmarks/minisd_vae_quality.py --vae PATH [--images 600] [--out FILE.json]

PATH is an exported model folder (its ``vae/`` subfolder), a ``vae/`` folder, or a
``datencoder minisd vae`` work dir (its EMA weights). ``--data`` (the emoji data set),
``--evaluator`` (default: the shipped one) and ``--vae`` are checked before anything is
computed; a missing one ends the run with a one-line error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from datencoder.emoji.batches import composition_index, load_rows_uint8, read_rows  # noqa: E402
from datencoder.emoji.evaluator import load_evaluator  # noqa: E402
from datencoder.errors import DatencoderError  # noqa: E402


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    from datencoder.training import find_checkpoint, read_checkpoint

    folder = path / "vae" if (path / "vae" / "config.json").exists() else path
    if find_checkpoint(path) is None and not (folder / "config.json").exists():
        raise DatencoderError(f"no VAE at {path}: give an exported model folder, a vae/ folder or a "
                              "'datencoder minisd vae' work dir")
    if find_checkpoint(path) is not None:  # a training work dir (either checkpoint layout): its EMA weights
        from datencoder.emoji.minisd.models import MiniVAEConfig, build_vae

        ckpt = read_checkpoint(path)
        vae = build_vae(MiniVAEConfig(**ckpt.meta["config"]["model"]))
        vae.load_state_dict(ckpt.averaged())
        return vae.eval()
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = [vae.decode(vae.encode(x[i:i + batch]).latent_dist.mean).sample.clamp(-1, 1) for i in range(0, len(x), batch)]
    # quantise like a saved image, so the numbers are those of a PNG a user would see
    return ((torch.cat(out) + 1) * 127.5).round() / 127.5 - 1


def concept_accuracy(evaluator, x: torch.Tensor, rows: list[dict]) -> dict:
    logits, _ = evaluator.logits(x)
    truth = torch.tensor([evaluator.index["concept"][r["concept"]] for r in rows])
    top5 = logits["concept"].topk(5, -1).indices
    return {"top1": float((top5[:, 0] == truth).float().mean()), "top5": float((top5 == truth[:, None]).any(-1).float().mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: the shipped one)")
    p.add_argument("--styles", default="noto,twemoji,openmoji,fluent3d")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    styles = args.styles.split(",")
    try:  # every input up front, before any image is read
        rows = [r for r in read_rows(args.data, ["train", "heldout_style"])
                if composition_index(r) == 3 and r["style"] in styles]
        if not rows:
            raise DatencoderError(f"no held-in composition-3 rows of styles {styles} in {args.data}")
        evaluator = load_evaluator(args.evaluator)
        t0 = time.perf_counter()
        vae = load_vae(Path(args.vae))
        load_seconds = time.perf_counter() - t0
    except DatencoderError as err:
        raise SystemExit(f"minisd_vae_quality: {err}") from None
    rows = [rows[int(i)] for i in torch.linspace(0, len(rows) - 1, min(args.images, len(rows))).long()]
    x = load_rows_uint8(args.data, rows).float() / 127.5 - 1
    t0 = time.perf_counter() - load_seconds  # "seconds": VAE loading + reconstruction + scoring, not image reading
    y = reconstruct(vae, x)
    mse = ((y - x) / 2).pow(2).mean(dim=(1, 2, 3))  # in [0, 1] pixel units
    psnr = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
    orig, recon = concept_accuracy(evaluator, x, rows), concept_accuracy(evaluator, y, rows)
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(), "threads": args.threads, "images": len(rows), "styles": styles,
        "latent": list(vae.encode(x[:1]).latent_dist.mean.shape[1:]),
        "psnr_db": round(psnr, 2), "originals": orig, "reconstructions": recon,
        "top1_ratio": round(recon["top1"] / max(orig["top1"], 1e-9), 3), "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
