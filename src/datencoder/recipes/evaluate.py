"""``datencoder evaluate CONFIG [key=value ...] [--methods a,b]``: compare methods on emoji targets.

Setup (config, targets), the harness (``datencoder.eval.harness.run_evaluation``: personalise,
generate, score every (method, target) pair not yet recorded in OUTPUT/records/), then the reports:
OUTPUT/records.jsonl (all methods), OUTPUT/results.md, OUTPUT/scatter.png and example grids.
Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_device_arguments, device_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="evaluation YAML (a path or a shipped name: eval_minisd)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seeds=[0]")
    parser.add_argument("--methods", default=None, metavar="NAMES",
                        help="comma-separated method names to run (default: all); reports cover all records. "
                             "Processes with disjoint --methods may share one output folder")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="run only the targets whose index modulo N is K (0 <= K < N); processes with "
                             "different shards may share one output folder")
    add_device_arguments(parser, variant=False)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..io import write_text_atomic
    from ..config import load_config
    from ..eval.config import EvalConfig
    from ..eval.harness import run_evaluation
    from ..eval.records import parse_shard, read_records
    from ..eval.targets import method_targets, select_targets
    from ..eval.report import example_grids, results_markdown, scatter_plot
    from ..image_io import save_image_atomic

    cfg = load_config(args.config, args.overrides, cls=EvalConfig)
    device_options(args)  # a missing CUDA fails before the targets are scanned
    names = [n.strip() for n in args.methods.split(",")] if args.methods else None
    shard = parse_shard(args.shard) if args.shard else None
    targets = select_targets(cfg.targets, shard)
    total = sum(len(method_targets(m, targets)) for m in cfg.methods if names is None or m.name in names)
    print(f"{len(targets)} targets, {total} (method, target) pairs -> {cfg.output_dir}")
    with tqdm(total=total, desc="evaluate", unit="pair") as bar:
        def on_pair(method: str, target: str, ran: bool) -> None:
            bar.set_postfix(method=method)
            bar.update(1)

        result = run_evaluation(cfg, names, on_pair, shard, *device_options(args))
    out = Path(cfg.output_dir)
    records = read_records(out)  # every method's file, also those other processes wrote
    # reports list reference rows (benchmarks/eval_reference.py) first, then the config's order
    order = {m.name: i for i, m in enumerate(cfg.methods)}
    records.sort(key=lambda r: (r.get("kind") != "reference", order.get(r["method"], len(order))))
    write_text_atomic(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    setup = json.loads((out / "eval_setup.json").read_text())
    write_text_atomic(out / "results.md", results_markdown(records, setup, cfg.paired_with))
    save_image_atomic(scatter_plot(records), out / "scatter.png")
    grids = example_grids(records, out, cfg.grids) if cfg.save_images else []
    print(f"ran {len(result['ran'])} pairs, skipped {len(result['skipped'])} already done")
    print(f"wrote {out / 'records.jsonl'} ({len(records)} images), {out / 'results.md'}, {out / 'scatter.png'}"
          + (f", {len(grids)} grids" if grids else ""))
    return 0
