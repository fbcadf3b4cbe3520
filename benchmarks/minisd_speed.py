"""Speed of the embedded default minisd-emoji on this CPU: load time and 4 images at 25 steps.

Load time is measured in fresh subprocesses, split into importing torch, importing the model
libraries, and ``load_base`` itself (the model's cost), plus their sum (the cold start).
Generation runs in this process, after one warm-up call, as the median of ``--repeats`` calls
of a stock StableDiffusionPipeline with DDIM and classifier-free guidance.

    python benchmarks/minisd_speed.py [--out reports/minisd_speed.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

LOAD_SNIPPET = """
import os, time
t0 = time.perf_counter()
import torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads({threads})
t1 = time.perf_counter()
from datencoder.base import load_base
import diffusers.models, diffusers.schedulers, transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, BertModel, CLIPVisionModel
t2 = time.perf_counter()
load_base({pretrained!r}, with_image_tower={tower})
t3 = time.perf_counter()
load_base({pretrained!r}, with_image_tower={tower})
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def load_seconds(pretrained: str, threads: int, tower: bool) -> tuple[float, ...]:
    """(import torch, import the model libraries, first load_base, second load_base), fresh process.

    The model libraries (diffusers' model and scheduler classes, transformers' BERT and CLIP
    vision classes, and what they pull in: torch._dynamo, peft) are imported before the first
    ``load_base``, so that row is the model's own cost; the cold-start row adds them back.
    """
    code = LOAD_SNIPPET.format(threads=threads, pretrained=pretrained, tower=tower)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(float(v) for v in out.stdout.strip().splitlines()[-1].split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", default="minisd-emoji")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="reports/minisd_speed.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datencoder.base import load_base
    from datencoder.emoji.minisd.sampling import make_pipeline

    loads = [load_seconds(args.pretrained, args.threads, True) for _ in range(args.repeats)]
    torches, libraries, firsts, seconds = ([run[i] for run in loads] for i in range(4))
    colds = [sum(run[:3]) for run in loads]
    base = load_base(args.pretrained, with_image_tower=False).freeze()
    pipe = make_pipeline(base.vae, base.unet, base.scheduler, base.tokenizer, base.text_encoder)
    prompt = "red apple, noto style, medium, center, on a blue background"

    def generate() -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(args.images)]
        t = time.perf_counter()
        with torch.no_grad():
            pipe([prompt] * args.images, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 generator=gens, output_type="pil")
        return time.perf_counter() - t

    generate()  # warm-up: first-call allocations and kernel selection
    gens = [generate() for _ in range(args.repeats)]
    load_avg = os.getloadavg()

    def row(what: str, runs: list[float], target: str = "") -> str:
        return f"| {what} | {statistics.median(runs):.2f} s | {', '.join(f'{x:.2f}' for x in runs)} | {target} |"

    cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# minisd-emoji: speed on CPU",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: 2-core CPU, no GPU ({platform.machine()}), torch {torch.__version__}, "
        f"`torch.set_num_threads({args.threads})`, fp32",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Load average while measuring (1/5/15 min): {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} "
        "(other jobs shared the machine; on an idle machine the times are lower)",
        "",
        "| what | median | all runs | target |",
        "|---|---|---|---|",
        row("import torch, fresh process", torches),
        row("import the model libraries: `datencoder.base`, diffusers (pulls torch._dynamo and peft), "
            "transformers", libraries),
        row(f"first `load_base('{args.pretrained}')` with image tower: the model load", firsts, "<= 3 s"),
        row("second `load_base` in the same process", seconds),
        row("cold start: process start to model ready (the three rows above the second load)", colds),
        row(f"{args.images} images, DDIM {args.steps} steps, guidance {args.guidance} (stock StableDiffusionPipeline)",
            gens, "<= 5 s"),
        "",
        "Generation is timed after one warm-up call and includes text encoding and VAE decoding.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
