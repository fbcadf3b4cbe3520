"""benchmarks/scale.py in --quick mode (tiny shapes, same block structure as SD 1.5): every stage
runs with the memory options and records finite, measured rows; one stage goes through the
per-phase subprocess the full-size measurements use (docs/scale.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_scale_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    common = ["--quick", "--out", str(tmp_path), "--threads", "1", "--tune-steps", "1", "--sample-steps", "2"]
    assert scale.main([*common, "--in-process", "--stages", "pretrain,personalize",
                       "--options", "bf16+ckpt", "--batch-sizes", "1,3"]) == 0
    done = subprocess.run([sys.executable, str(SCRIPT), *common, "--stages", "generate,export", "--options", "fp32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(tmp_path)
    assert [(r["stage"], r["option"], r["batch"]) for r in rows] == [
        ("pretrain", "bf16+ckpt", 1), ("personalize", "bf16+ckpt", 1), ("personalize", "bf16+ckpt", 3),
        ("generate", "fp32", 1), ("export", "fp32", 1)]
    for r in rows:
        assert r["status"] == "measured" and r["finite"] and r["seconds"] > 0 and r["peak_mb"] > 0, r
    tokenizer = json.loads((tmp_path / "model" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 77  # the real CLIP length, as in every SD 1.x/2.x model
    assert "| generate | 2 | 1 | fp32 | no |" in (tmp_path / "table.md").read_text()


def test_scale_benchmark_quick_sdxl(tmp_path):
    """The SDXL architecture (two text encoders, text_time embedding) runs every stage in-process."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    assert scale.main(["--quick", "--arch", "sdxl", "--out", str(tmp_path), "--threads", "1", "--tune-steps", "1",
                       "--sample-steps", "2", "--in-process", "--options", "bf16+ckpt", "--batch-sizes", "3"]) == 0
    rows = _rows(tmp_path)
    assert [(r["stage"], r["arch"]) for r in rows] == [
        ("pretrain", "quick_sdxl"), ("personalize", "quick_sdxl"), ("generate", "quick_sdxl"), ("export", "quick_sdxl")]
    for r in rows:
        assert r["status"] == "measured" and r["finite"], r
    assert (tmp_path / "model" / "text_encoder_2" / "config.json").is_file()
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["addition_embed_type"] == "text_time"
