"""Reports of an evaluation: per-method aggregates, a markdown table, a scatter plot, grids.

Aggregates are computed per target first (the mean over its prompts x seeds; an attribute's
accuracy only over the prompts that state it), then as mean +- std over targets, so every
target weighs the same whatever the number of prompts stating each attribute.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["aggregate", "paired_deltas", "subset_target_sets", "beyond_two_se", "results_markdown", "scatter_plot", "example_grids", "METRICS"]

METRICS = ("identity", "top1", "top5", "style_ok", "background_ok", "position_ok", "size_ok", "editability",
           "clip_i", "dino", "clip_t", "seconds", "peak_mb")
_TITLES = {"identity": "identity", "top1": "concept top-1", "top5": "concept top-5", "style_ok": "style",
           "background_ok": "background", "position_ok": "position", "size_ok": "size",
           "editability": "editability", "clip_i": "CLIP-I", "dino": "DINO", "clip_t": "CLIP-T",
           "seconds": "seconds", "peak_mb": "peak MB"}
_PAIRED = ("identity", "editability", "clip_i", "dino", "clip_t")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _per_target(records: list[dict]) -> dict[str, float | None]:
    row = {m: _mean(r.get(m) for r in records) for m in METRICS if m != "editability"}
    # editability: every stated attribute check of every image counts once
    row["editability"] = _mean(r.get(f"{a}_ok") for r in records for a in ("background", "position", "size"))
    return row


def aggregate(records: list[dict], by_group: bool = False) -> dict:
    """{method (or (method, group)): {metric: (mean, std, n_targets)}} in first-seen order."""
    per: dict = {}
    for r in records:
        key = (r["method"], r["group"]) if by_group else r["method"]
        per.setdefault(key, {}).setdefault(r["target"], []).append(r)
    result = {}
    for key, targets in per.items():
        rows = [_per_target(recs) for recs in targets.values()]
        result[key] = {}
        for m in METRICS:
            values = [row[m] for row in rows if row[m] is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            result[key][m] = (sum(values) / len(values), std, len(values)) if values else (None, None, 0)
    return result


def paired_deltas(records: list[dict], reference: str,
                  metrics: tuple[str, ...] = ("identity", "editability"), targets: set[str] | None = None) -> dict:
    """{method: {metric: (mean, standard error, n)}} of (method - reference) over shared targets.

    Targets differ far more from each other than methods do, so a method is compared with the
    reference on the same targets: the per-target difference, then its mean and standard error.
    ``targets``: only these targets.
    """
    per: dict = {}
    for r in records:
        if targets is None or r["target"] in targets:
            per.setdefault(r["method"], {}).setdefault(r["target"], []).append(r)
    if reference not in per:
        return {}
    ref = {t: _per_target(recs) for t, recs in per[reference].items()}
    result = {}
    for method, targets in per.items():
        if method == reference:
            continue
        rows = {t: _per_target(recs) for t, recs in targets.items() if t in ref}
        result[method] = {}
        for m in metrics:
            diffs = [row[m] - ref[t][m] for t, row in rows.items() if row[m] is not None and ref[t][m] is not None]
            sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
            result[method][m] = (sum(diffs) / len(diffs), sem, len(diffs)) if diffs else (None, None, 0)
    return result


def _cell(stat, metric: str) -> str:
    mean, std, _ = stat
    if mean is None:
        return "—"
    if metric == "peak_mb":
        return f"{mean:.0f} ± {std:.0f}"
    if metric == "seconds":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def _present(agg: dict, metrics=METRICS) -> list[str]:
    """The metrics some method has a value of (an emoji-only evaluation shows no CLIP columns)."""
    return [m for m in metrics if any(stats[m][0] is not None for stats in agg.values())]


def _table(agg: dict, label) -> list[str]:
    metrics = _present(agg)
    head = ["method", "targets"] + [_TITLES[m] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, stats in agg.items():
        n = max(s[2] for s in stats.values())
        lines.append("| " + " | ".join([label(key), str(n)] + [_cell(stats[m], m) for m in metrics]) + " |")
    return lines


def results_markdown(records: list[dict], setup: dict | None = None, paired_with: str | None = None) -> str:
    """Tables of every method (all targets, then per group); with ``paired_with``, also each
    method's per-target difference from that method (mean ± standard error)."""
    lines = ["# Evaluation results", ""]
    if setup:
        lines += [f"Prompts ({len(setup['prompts'])}): " + "; ".join(f"`{p}`" for p in setup["prompts"]),
                  f"Seeds: {setup['seeds']}; sampling: {setup['scheduler']} {setup['sample_steps']} steps, "
                  f"guidance {setup['guidance']}; base `{setup['base']}`.", ""]
    lines += ["Mean ± std over targets (each target: mean over its prompts × seeds). Identity: cosine of "
              "evaluator embeddings to the input image; style: rate of the target's style; background / "
              "position / size: accuracy over the prompts that state it; editability: all stated checks; "
              "seconds and peak MB: personalisation only. CLIP-I / DINO: cosine of CLIP image / DINOv2 CLS "
              "embeddings to the input image; CLIP-T: CLIP image-text cosine with the prompt, S* replaced by the "
              "class word.", "", "## All targets", ""]
    lines += _table(aggregate(records), str)
    groups = sorted({r["group"] for r in records})
    if len(groups) > 1:
        lines += ["", "## By target group", ""]
        order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in records))}
        by_group = aggregate(records, by_group=True)
        by_group = dict(sorted(by_group.items(), key=lambda kv: (order[kv[0][0]], groups.index(kv[0][1]))))
        lines += _table(by_group, lambda k: f"{k[0]} ({k[1]})")
    if paired_with:
        lines += _paired_table(records, paired_with, None, f"## Paired with `{paired_with}`")
        for subset, methods in subset_target_sets(records, paired_with):
            lines += _paired_table(records, paired_with, subset,
                                   f"## Paired with `{paired_with}` on the {len(subset)} targets of "
                                   + ", ".join(f"`{m}`" for m in methods))
    return "\n".join(lines) + "\n"


def beyond_two_se(stats: dict, metrics) -> str:
    """The metrics whose paired difference exceeds two standard errors, signed ("identity +")."""
    out = [f"{_TITLES[m]} {'+' if stats[m][0] > 0 else '−'}" for m in metrics
           if stats[m][0] is not None and stats[m][2] > 1 and abs(stats[m][0]) > 2 * stats[m][1]]
    return ", ".join(out) or "none"


def subset_target_sets(records: list[dict], reference: str) -> list[tuple[set[str], list[str]]]:
    """Target sets smaller than the reference's that two or more methods share (a costly method
    family run on a subset): [(targets, methods run on exactly them)], largest first."""
    per: dict = {}
    for r in records:
        per.setdefault(r["method"], set()).add(r["target"])
    everything = per.get(reference, set())
    shared: dict = {}
    for method, targets in per.items():
        if method != reference and targets < everything:
            shared.setdefault(frozenset(targets), []).append(method)
    return sorted(((set(t), m) for t, m in shared.items() if len(m) > 1), key=lambda x: -len(x[0]))


def _paired_table(records: list[dict], reference: str, subset: set[str] | None, title: str) -> list[str]:
    deltas = paired_deltas(records, reference, _PAIRED, subset)
    if subset is not None:  # only the methods that ran on every target of the subset
        covered = {}
        for r in records:
            covered.setdefault(r["method"], set()).add(r["target"])
        deltas = {m: st for m, st in deltas.items() if subset <= covered[m]}
    shown = _present(deltas, _PAIRED) if deltas else []
    if not shown:
        return []
    lines = ["", title, "",
             f"Per target: the method's mean minus `{reference}`'s on the same target; then mean ± "
             "standard error over targets (positive: better than it); the last column names the "
             "differences larger than two standard errors.", "",
             "| method | targets | " + " | ".join(f"Δ {_TITLES[m]}" for m in shown) + " | beyond 2 s.e. |",
             "|---|---|" + "---|" * len(shown) + "---|"]
    for method, stats in deltas.items():
        n = max(st[2] for st in stats.values())
        cells = ["—" if stats[m][0] is None else f"{stats[m][0]:+.3f} ± {stats[m][1]:.3f}" for m in shown]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + f" | {beyond_two_se(stats, shown)} |")
    return lines


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def scatter_plot(records: list[dict], size: tuple[int, int] = (900, 520)) -> Image.Image:
    """Identity (x) vs editability (y), one numbered point per method (mean over targets).

    The legend on the right names each number with the method and its two values, so that
    methods with nearly equal scores stay readable.
    """
    agg = aggregate(records)
    # the emoji evaluator's axes, or the paper's (DINO or CLIP-I vs CLIP-T) when only those were scored
    x_key, y_key = "identity", "editability"
    if not any(s["identity"][0] is not None for s in agg.values()):
        x_key = "dino" if any(s["dino"][0] is not None for s in agg.values()) else "clip_i"
        y_key = "clip_t"
    points = [(m, s[x_key][0], s[y_key][0]) for m, s in agg.items()
              if s[x_key][0] is not None and s[y_key][0] is not None]
    w, h = size
    legend_w = 260
    left, right, top, bottom = 60, 20 + legend_w, 30, 50
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[1] for p in points] or [0.0, 1.0]
    ys = [p[2] for p in points] or [0.0, 1.0]
    pad_x = max(0.05, (max(xs) - min(xs)) * 0.15)
    pad_y = max(0.05, (max(ys) - min(ys)) * 0.15)
    x0, x1 = min(xs) - pad_x, max(xs) + pad_x
    # editability is a rate: keep its axis inside [0, 1]; CLIP-T is a cosine, inside [-1, 1]
    y0, y1 = max(0.0 if y_key == "editability" else -1.0, min(ys) - pad_y), min(1.0, max(ys) + pad_y)
    if y1 <= y0:
        y0, y1 = 0.0, 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for tx in _ticks(x0, x1):
        px, _ = to_px(tx, y0)
        draw.line([px, h - bottom, px, h - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 12, h - bottom + 6), f"{tx:.2f}", fill=(0, 0, 0), font=font)
    for ty in _ticks(y0, y1):
        _, py = to_px(x0, ty)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((left - 34, py - 5), f"{ty:.2f}", fill=(0, 0, 0), font=font)
    x_title = {"identity": "identity (cosine to input)", "dino": "DINO (cosine to input)",
               "clip_i": "CLIP-I (cosine to input)"}[x_key]
    y_title = "editability (stated attributes correct)" if y_key == "editability" else "CLIP-T (image-text cosine)"
    draw.text(((w - legend_w - 160) // 2, h - 22), x_title, fill=(0, 0, 0), font=font)
    draw.text((8, 8), y_title, fill=(0, 0, 0), font=font)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    line_h = max(12, min(18, (h - top - 10) // max(1, len(points))))
    for i, (name, x, y) in enumerate(points):
        px, py = to_px(x, y)
        colour = palette[i % len(palette)]
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline=(0, 0, 0))
        # rotate number placements (above right, below right, left) so close points stay readable
        label = str(i + 1)
        dx, dy = ((6, -14), (6, 4), (-8 - draw.textlength(label, font=font), -5))[i % 3]
        draw.text((px + dx, py + dy), label, fill=colour, font=font)
        ly = top + i * line_h
        draw.ellipse([w - legend_w + 10, ly + 2, w - legend_w + 18, ly + 10], fill=colour, outline=(0, 0, 0))
        draw.text((w - legend_w + 24, ly), f"{label} {name}  ({x:.3f}, {y:.3f})", fill=(0, 0, 0), font=font)
    return img


def example_grids(records: list[dict], out_dir: str | Path, max_targets: int = 2) -> list[Path]:
    """One grid per target (the first ``max_targets``): a row per method, input image then prompts."""
    from ..image_io import load_image, make_grid, save_image_atomic

    out_dir = Path(out_dir)
    targets = list(dict.fromkeys(r["target"] for r in records if r.get("file")))[:max_targets]
    written = []
    for t_index, target in enumerate(targets):
        recs = [r for r in records if r["target"] == target and r.get("file")]
        seed = min(r["seed"] for r in recs)
        methods = list(dict.fromkeys(r["method"] for r in recs))
        prompts = sorted({r["prompt_index"] for r in recs})
        reference = load_image(target)
        images, labels = [], []
        for method in methods:
            by_prompt = {r["prompt_index"]: r for r in recs if r["method"] == method and r["seed"] == seed}
            side = Image.open(out_dir / by_prompt[prompts[0]]["file"]).size
            images.append(reference.resize(side))
            labels.append(method)
            for p in prompts:
                images.append(Image.open(out_dir / by_prompt[p]["file"]).convert("RGB"))
                labels.append(f"p{p}")
        path = out_dir / f"grid_{t_index}_{Path(target).stem}.png"
        save_image_atomic(make_grid(images, cols=len(prompts) + 1, labels=labels), path)
        written.append(path)
    return written
