"""benchmarks/scale.py in --quick mode (tiny shapes, same block structure as SD 1.5): every stage
runs with the memory options and records finite, measured rows; one stage goes through the
per-phase subprocess the full-size measurements use (docs/scale.md). --count-heads at the real
SD 1.5 and SDXL shapes, on the meta device."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_scale_benchmark_quick(tmp_path):
    scale = _scale()
    common = ["--quick", "--out", str(tmp_path), "--threads", "1", "--tune-steps", "1", "--sample-steps", "2"]
    assert scale.main([*common, "--in-process", "--stages", "pretrain,personalize",
                       "--options", "bf16+ckpt", "--batch-sizes", "1,3"]) == 0
    done = subprocess.run([sys.executable, str(SCRIPT), *common, "--stages", "generate,export", "--options", "fp32",
                           "--hypernet-mode", "core"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(tmp_path)
    assert [(r["stage"], r["option"], r["batch"]) for r in rows] == [
        ("pretrain", "bf16+ckpt", 1), ("personalize", "bf16+ckpt", 1), ("personalize", "bf16+ckpt", 3),
        ("generate", "fp32", 1), ("export", "fp32", 1)]
    for r in rows:
        assert r["status"] == "measured" and r["finite"] and r["seconds"] > 0 and r["peak_mb"] > 0, r
    assert [r["hypernet_mode"] for r in rows] == ["factorized"] * 3 + ["core"] * 2  # the child's own config
    tokenizer = json.loads((tmp_path / "model" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 77  # the real CLIP length, as in every SD 1.x/2.x model
    assert "| generate | 2 | 1 | fp32 | no |" in (tmp_path / "table.md").read_text()


def test_scale_benchmark_quick_sdxl(tmp_path):
    """The SDXL architecture (two text encoders, text_time embedding) runs every stage in-process."""
    scale = _scale()
    assert scale.main(["--quick", "--arch", "sdxl", "--out", str(tmp_path), "--threads", "1", "--tune-steps", "1",
                       "--sample-steps", "2", "--in-process", "--options", "bf16+ckpt", "--batch-sizes", "3"]) == 0
    rows = _rows(tmp_path)
    assert [(r["stage"], r["arch"]) for r in rows] == [
        ("pretrain", "quick_sdxl"), ("personalize", "quick_sdxl"), ("generate", "quick_sdxl"), ("export", "quick_sdxl")]
    for r in rows:
        assert r["status"] == "measured" and r["finite"], r
    assert (tmp_path / "model" / "text_encoder_2" / "config.json").is_file()
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["addition_embed_type"] == "text_time"


def test_the_default_hypernetwork_fits_sd15_and_sdxl_and_full_is_refused(capsys):
    """At the shipped settings (sd15.yaml: rank 4, hidden 1024) on the real shapes: the default
    factorized hypernetwork stays under 5 % of the UNet, full is refused in one line stating the count
    before anything is allocated, and the shipped minisd-emoji full encoder's size still passes."""
    import dataclasses

    import pytest

    from datencoder.attention import target_layer_shapes
    from datencoder.config import load_config
    from datencoder.encoder import check_head_size, head_weight_counts
    from datencoder.errors import DatencoderError

    scale = _scale()
    assert scale.main(["--count-heads"]) == 0
    table = capsys.readouterr().out
    rows = {(r["base"], r["mode"]): r for r in scale.head_counts()}
    for arch in ("sd15", "sdxl"):
        assert rows[arch, "factorized"]["fraction"] < 0.05 and not rows[arch, "factorized"]["refused"]
        assert rows[arch, "full"]["refused"] and rows[arch, "full"]["fraction"] > 0.9
        assert rows[arch, "factorized"]["tune_heads_weights"] < 0.01 * rows[arch, "factorized"]["unet_weights"]
        assert f"| {arch} | {rows[arch, 'full']['unet_weights']:,} | full |" in table
    assert not rows["minisd", "full"]["refused"]  # the shipped minisd-emoji-encoder-v1
    assert rows["sd15", "full"]["hypernetwork_weights"] > 800_000_000

    unet = scale.meta_unet("sd15")
    enc = dataclasses.replace(load_config("sd15").encoder, hypernet_mode="full")
    shapes = target_layer_shapes(unet, enc.targets, enc.attention_kinds)
    with pytest.raises(DatencoderError) as err:
        check_head_size(enc, shapes, sum(p.numel() for p in unet.parameters()))
    count = sum(head_weight_counts(enc, shapes).values())
    assert "\n" not in str(err.value) and f"{count:,} weights" in str(err.value)
    assert check_head_size(dataclasses.replace(enc, max_head_fraction=None), shapes, 1) == count
