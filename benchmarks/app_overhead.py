"""What the web page adds: the same personalisation and generation, library call vs running app.

Both sides run on the embedded default with the same settings (``--steps`` tuning steps,
``--images`` images at ``--sample-steps`` DDIM steps, guidance 7.5, seed 0, dual path on):

- library: what ``datencoder personalize`` + ``datencoder generate`` do after their model load:
  load_image, personalize, concept.save, ConceptPipeline, save each PNG;
- app: ``datencoder app`` in a subprocess on 127.0.0.1, driven by gradio_client: upload +
  personalise (which also zips the concept and writes and zips the diffusers export) and
  generate (images encoded, sent and downloaded by the client).

The two alternate, ``--repeats`` times each after one warm-up of each; the app's server and
this process use the same thread count. Model loading is not counted on either side (the app
loads once per process, the CLI once per command: reported separately as the CLI's load).

    python benchmarks/app_overhead.py [--out reports/app_overhead.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = "S*, on a blue background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "datencoder.recipes.cli", "app", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if re.search(r"serving on http://", line):
            return proc, f"http://127.0.0.1:{port}/"
    raise SystemExit("the app did not start")


def library_run(system, image_path: Path, args, work: Path) -> float:
    from datencoder.image_io import image_to_tensor, load_image, save_image_atomic
    from datencoder.pipeline import ConceptPipeline
    from datencoder.tuning import personalize

    start = time.perf_counter()
    pixels = image_to_tensor(load_image(image_path), system.base.resolution)
    concept = personalize(system, pixels, replace(system.cfg.tune, steps=args.steps, seed=0))
    concept.save(work / "concept")
    images = ConceptPipeline(system.base, concept)(PROMPT, num_images_per_prompt=args.images,
                                                   num_inference_steps=args.sample_steps, guidance_scale=7.5,
                                                   seed=0).images
    for i, image in enumerate(images):
        save_image_atomic(image, work / f"{i:03d}.png")
    return time.perf_counter() - start


def app_run(client, image_path: Path, args) -> float:
    from gradio_client import handle_file

    start = time.perf_counter()
    *_, pick = client.predict(handle_file(image_path), args.steps, api_name="/personalise")
    gallery = client.predict(pick["value"], PROMPT, 0, args.images, 7.5, True, args.sample_steps, api_name="/generate")
    assert len(gallery) == args.images
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from gradio_client import Client

    from datencoder.recipes.app import load_system
    from datencoder.recipes.demo import DEMO_DIR
    from datencoder.system import DEFAULT_ENCODER_DIR

    image = DEMO_DIR / "red_apple.png"
    t = time.perf_counter()
    system = load_system(DEFAULT_ENCODER_DIR)
    load_s = time.perf_counter() - t
    proc, url = start_app(args.threads)
    work = Path(tempfile.mkdtemp(prefix="app-overhead-"))
    lib, app = [], []
    try:
        client = Client(url, verbose=False, download_files=str(work / "downloads"))
        library_run(system, image, args, work)  # warm-up of both
        app_run(client, image, args)
        for _ in range(args.repeats):
            lib.append(library_run(system, image, args, work))
            app.append(app_run(client, image, args))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    lib_med, app_med = statistics.median(lib), statistics.median(app)
    overhead = app_med / lib_med - 1
    load = os.getloadavg()
    cmd = "python benchmarks/app_overhead.py" + (f" --out {args.out}" if args.out else "")
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    text = f"""# datencoder app: what the web page adds

- Command: `{cmd}`
- Machine: {os.cpu_count()}-core CPU, no GPU ({platform.machine()}), torch {torch.__version__}, `torch.set_num_threads({args.threads})` here and `OMP_NUM_THREADS={args.threads}` in the app's process, fp32
- Date: {datetime.date.today().isoformat()} ({datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC)
- Load average when it finished (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared the machine)
- Work: the bundled red_apple.png on the embedded default; {args.steps} tuning steps, then {args.images} images of
  "{PROMPT}" at {args.sample_steps} DDIM steps, guidance 7.5, seed 0, dual path on

| path | median | all runs ({args.repeats}, alternating, after one warm-up each) |
|---|---|---|
| library (what `personalize` + `generate` do after their model load; concept and PNGs saved) | {lib_med:.2f} s | {fmt(lib)} |
| app through gradio_client (upload, personalise, zip + diffusers export, generate, download) | {app_med:.2f} s | {fmt(app)} |
| **overhead of the app** | **{overhead * 100:+.1f} %** | target < 10 % |

Not counted above: the model load, {load_s:.2f} s here, which the CLI pays in each of its two
commands and the app once at start.
"""
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
