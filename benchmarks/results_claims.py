"""The issue's claims about our method, checked on an evaluation's records (docs/results.md).

For a method (default ``ours-12``), against the floor (no personalisation), Textual Inversion at
500 steps and its idle-machine cost (``benchmarks/eval_speed.py``'s JSON):

1. it adds identity over the floor by more than two standard errors (paired over targets);
2. it keeps editability: at most 0.05 below the floor (more editable than the floor keeps it too);
3. it reaches at least Textual Inversion-500's identity (paired on the targets both ran);
4. it costs at most 1/20 of Textual Inversion-500's time (idle timings, same thread count);
5. with ``--top5-target X``: the share of its images whose concept is among the evaluator's 5 most
   likely (``top5`` of the records; targets without a concept class are left out) is at least X.

Each claim is printed as one markdown line with its numbers and whether it holds, for all targets
and for each target group.

    python benchmarks/results_claims.py [--records runs/eval/minisd_fixed] [--method ours-12]
        [--floor no-personalisation] [--ti ti-500] [--speed reports/eval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datencoder.errors import DatencoderError
from datencoder.eval.records import read_records
from datencoder.eval.report import paired_deltas


def _fmt(stat) -> str:
    mean, sem, n = stat
    return f"{mean:+.3f} ± {sem:.3f} (n = {n})"


def top5_share(records: list[dict], method: str) -> tuple[float, float, int] | None:
    """Mean over targets of the share of their images with the concept in the top 5, its s.e., targets."""
    per_target: dict[str, list[int]] = {}
    for r in records:
        if r["method"] == method and r.get("top5") is not None:
            per_target.setdefault(r["target"], []).append(r["top5"])
    if not per_target:
        return None
    shares = [sum(v) / len(v) for v in per_target.values()]
    n = len(shares)
    mean = sum(shares) / n
    sem = (sum((x - mean) ** 2 for x in shares) / (n - 1) / n) ** 0.5 if n > 1 else 0.0
    return mean, sem, n


def claims(records: list[dict], method: str, floor: str, ti: str, speed: dict | None,
           top5_target: float | None = None) -> list[str]:
    lines = []
    groups = [None] + sorted({r["group"] for r in records})
    for group in groups:
        rs = [r for r in records if group is None or r["group"] == group]
        label = "all targets" if group is None else f"group {group}"
        vs_floor = paired_deltas(rs, floor).get(method)
        if not vs_floor or vs_floor["identity"][0] is None:
            lines.append(f"- {label}: no paired records of `{method}` and `{floor}`")
            continue
        ident, edit = vs_floor["identity"], vs_floor["editability"]
        holds = ident[0] > 2 * ident[1]
        lines.append(f"- {label}: **identity over the floor** Δ {_fmt(ident)}: "
                     f"{'holds' if holds else 'does not hold'} (needs Δ > 2 s.e. = {2 * ident[1]:.3f})")
        # one-sided: the claim is that editability is kept (a method more editable than the floor keeps it)
        within = edit[0] >= -0.05
        lines.append(f"- {label}: **editability not more than 0.05 below the floor** Δ {_fmt(edit)}: "
                     f"{'holds' if within else 'does not hold'}"
                     f"{'' if edit[0] - 2 * edit[1] >= -0.05 else ' (the ±2 s.e. interval reaches past -0.05)'}")
        vs_ti = paired_deltas(rs, ti).get(method)
        if vs_ti and vs_ti["identity"][0] is not None:
            d = vs_ti["identity"]
            verdict = ("holds" if d[0] >= 0 else
                       "does not hold, within 2 s.e." if d[0] + 2 * d[1] >= 0 else "does not hold, beyond 2 s.e.")
            lines.append(f"- {label}: **identity at least `{ti}`'s** ({method} − {ti}, paired) Δ {_fmt(d)}: {verdict}")
        share = top5_share(rs, method) if top5_target is not None else None
        if share is not None:
            floor_share = top5_share(rs, floor)
            lines.append(f"- {label}: **concept top-5 at least {top5_target:.0%}**: {share[0]:.1%} ± {share[1]:.1%} "
                         f"of the images (n = {share[2]} targets; `{floor}`: "
                         f"{'n/a' if floor_share is None else f'{floor_share[0]:.1%}'}): "
                         f"{'holds' if share[0] >= top5_target else 'does not hold'}")
    if speed:
        rows = {r["method"]: r for r in speed["rows"]}
        ours = rows.get(method, {}).get("seconds")
        ti_s = next((r["extrapolated_seconds"][ti] for r in speed["rows"] if ti in r.get("extrapolated_seconds", {})),
                    None)
        if ours is not None and ti_s:
            ratio = ours / ti_s
            lines.append(f"- **cost at most 1/20 of `{ti}`**: {ours:.2f} s against {ti_s:.1f} s "
                         f"(1/{1 / ratio:.0f}; {speed['machine']}, {speed['date']}): "
                         f"{'holds' if ratio <= 1 / 20 else 'does not hold'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", default="runs/eval/minisd_fixed")
    parser.add_argument("--method", default="ours-12")
    parser.add_argument("--floor", default="no-personalisation")
    parser.add_argument("--ti", default="ti-500")
    parser.add_argument("--speed", default="reports/eval_speed.json")
    parser.add_argument("--top5-target", type=float, default=None,
                        help="also check that the concept is among the top 5 in at least this share of images")
    args = parser.parse_args(argv)
    try:
        records = read_records(Path(args.records))
        if not records:
            raise DatencoderError(f"no evaluation records in {args.records}")
        speed = json.loads(Path(args.speed).read_text()) if Path(args.speed).is_file() else None
    except DatencoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Claims for `{args.method}` ({args.records}):")
    print("\n".join(claims(records, args.method, args.floor, args.ti, speed, args.top5_target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
