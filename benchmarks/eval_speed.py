"""Personalisation cost of each method family on one target, on an otherwise idle machine.

The evaluation (``datencoder evaluate``) records seconds per pair, but on a small machine it runs
several processes side by side, so those seconds include waiting for the CPU. This script times
the same code paths alone: our encoder at 0 / 12 / 50 steps (also with its heads tuned, and the
per-sample hypernetwork encoder, the shipped default, at 12), Textual Inversion, DreamBooth-LoRA
and whole-UNet DreamBooth for a few steps (seconds per step, and the step counts of the
comparison extrapolated from it, marked as such). Memory: the peak
resident set during the personalisation itself (the high-water mark is reset just before it) and
the resident set at its start (the loaded base model, the encoder and what the allocator kept from
the warm-up run), in MB; on the CPU the difference is not the personalisation's own need, since
the warm-up's freed memory is reused.

    python benchmarks/eval_speed.py [--config eval_minisd_fixed] [--threads 1] [--out reports/eval_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from datencoder.base import load_base  # noqa: E402
from datencoder.io import write_json_atomic  # noqa: E402
from datencoder.config import load_config  # noqa: E402
from datencoder.eval.config import EvalConfig  # noqa: E402
from datencoder.cost import measure  # noqa: E402
from datencoder.eval.harness import personalize_with  # noqa: E402
from datencoder.eval.targets import select_targets  # noqa: E402
from datencoder.image_io import image_to_tensor, load_image  # noqa: E402


def _resident_mb() -> float | None:
    """This process's resident set now (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="eval_minisd_fixed")
    parser.add_argument("--out", default="reports/eval_speed.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [], cls=EvalConfig)
    target = select_targets(cfg.targets)[0]
    base = load_base(cfg.base, cfg.image_tower)
    pixels = image_to_tensor(load_image(target.image), base.resolution)
    by_name = {m.name: m for m in cfg.methods}
    # (method to time, steps to time it at); the baselines' longer runs are extrapolated per step
    plan = [("ours-0", None), ("ours-12", None), ("ours-50", None), ("tune-heads-12", None),
            ("full-hypernet-12", None), ("ti-100", 20), ("db-lora-50", 20), ("db-unet-400", 20),
            ("db-unet-200", 20)]
    plan = [(name, steps) for name, steps in plan if name in {m.name for m in cfg.methods}]
    load_before = os.getloadavg()
    systems: dict = {}
    rows = []
    for name, steps in plan:
        method = by_name[name]
        if steps is not None:
            method = dataclasses.replace(method, steps=steps)
        personalize_with(method, base, pixels, systems, {})  # warm-up (loads the encoder once)
        resident = _resident_mb()
        with measure() as phase:
            concept, _ = personalize_with(method, base, pixels, systems, {})
        seconds = phase.seconds
        peak = concept.info.get("peak_memory_mb")
        row = {"method": name, "timed_steps": method.steps, "seconds": round(seconds, 3), "peak_mb": peak,
               "resident_at_start_mb": None if resident is None else round(resident, 1)}
        if steps is not None:
            per_step = seconds / steps
            row["seconds_per_step"] = round(per_step, 4)
            family = [m for m in cfg.methods if m.kind == method.kind and m.steps > 0]
            row["extrapolated_seconds"] = {m.name: round(per_step * m.steps, 1) for m in family}
        rows.append(row)
        print(json.dumps(row))
    result = {"command": "python benchmarks/eval_speed.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
                         f"{args.threads} threads", "date": datetime.date.today().isoformat(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "target": target.image, "rows": rows}
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from datencoder.errors import DatencoderError

    try:
        sys.exit(main())
    except DatencoderError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
