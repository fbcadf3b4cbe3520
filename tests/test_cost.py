"""One cost measure (``cost.measure``) for every phase and every method's row of the harness."""

from __future__ import annotations

import pytest
import torch

from datencoder import cost
from datencoder.cost import measure
from datencoder.eval.harness import run_evaluation

from test_evaluation import _eval_config, emoji_root, encoder_dir, evaluator_dir  # noqa: F401 (fixtures)

BIG = 256  # MB


def _touch(mb: int) -> torch.Tensor:
    return torch.ones(mb * 2**20 // 4)  # written, so resident


def test_cpu_peak_grows_with_a_phases_allocation_and_is_reset_between_phases():
    with measure("cpu") as outer:
        with measure("cpu") as big:
            x = _touch(BIG)
            del x
        with measure("cpu") as small:
            y = _touch(1)
            del y
    if big.peak_of != "rss":
        pytest.skip(f"this kernel does not let a process reset its VmHWM ({big.peak_of})")
    assert big.peak_of == small.peak_of == outer.peak_of == "rss"
    assert big.peak_mb > small.peak_mb + 0.8 * BIG  # the second phase starts from a reset peak
    assert outer.peak_mb >= big.peak_mb  # an inner reset does not hide the enclosing phase's peak
    assert big.seconds > 0 and outer.seconds >= big.seconds + small.seconds


def test_every_method_row_of_the_harness_takes_its_cost_from_measure(tiny_base_dir, emoji_root, evaluator_dir,
                                                                      encoder_dir, tmp_path, monkeypatch):
    """Ours, Textual Inversion, DreamBooth-LoRA and whole-UNet DreamBooth (E4T is an encoder: 'ours')."""
    readings = []

    def marked(device="cpu"):
        readings.append(str(device))
        return 4321.0

    monkeypatch.setattr(cost, "peak_memory_mb", marked)
    cfg = _eval_config(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir, tmp_path / "eval")
    records = run_evaluation(cfg)["records"]
    assert {r["method"] for r in records} == {"ours-1", "ti-2", "db-2", "dbu-2"}
    assert all(r["peak_mb"] == 4321.0 and r["peak_of"] == records[0]["peak_of"] and r["seconds"] > 0
               for r in records)
    assert readings and set(readings) == {"cpu"}  # on the device the work ran on
