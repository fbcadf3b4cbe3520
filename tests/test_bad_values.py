"""Nothing silently wrong: non-finite values refused where they enter and detected where they arise,
hand-edited artifacts refused at load in one line naming the file, sizes checked against stated
limits before any compute, and the small cases (forgotten prompt, S* without a concept, ...) as one
line. CLI cases run in-process through ``cli.main`` on the tiny base."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.config import TuneConfig
from datencoder.errors import DatencoderError
from datencoder.io import file_sha256, load_tensors
from datencoder.recipes import cli
from datencoder.system import EncoderSystem
from datencoder.training import LoopConfig, fit, read_checkpoint
from datencoder.tuning import personalize


from cli_helpers import cli_error as _error, tiny_encoder_config  # noqa: E402

@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = load_base(str(tiny_base_dir))
    cfg = tiny_encoder_config(tiny_base_dir)
    system = EncoderSystem(base, cfg)
    system.save(root / "encoder")
    pixels = torch.rand(3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    personalize(system, pixels, TuneConfig(steps=0)).save(root / "concept")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ok.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(root / "wide.png")
    frames = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    return {"root": root, "base": tiny_base_dir, "encoder": root / "encoder", "image": root / "ok.png",
            "concept": root / "concept", "resolution": base.resolution}




def _ok(capsys, argv) -> str:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out + captured.err


def _personalize(world, out, *extra):
    return ["personalize", world["image"], "--encoder", world["encoder"], "--out", out, "--steps", "0", *extra]


# -- non-finite values where they enter -----------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("tune.lr_lora=.inf", "'tune.lr_lora' must be a finite number, got inf"),
    ("tune.lr_embedding=.nan", "'tune.lr_embedding' must be a finite number, got nan"),
    ("encoder.lora_scale=-.inf", "'encoder.lora_scale' must be a finite number"),
])
def test_non_finite_and_unbounded_config_values_are_refused(world, capsys, tmp_path, override, message):
    assert message in _error(capsys, _personalize(world, tmp_path / "c", override))
    assert not (tmp_path / "c").exists()


def test_non_finite_values_built_in_code_are_refused():
    with pytest.raises(DatencoderError, match="tune.lr_lora must be > 0"):
        TuneConfig(lr_lora=float("inf"))
    with pytest.raises(DatencoderError, match="train.lr must be > 0 and finite"):
        LoopConfig(work_dir="x", steps=1, batch_size=1, lr=float("inf"))
    with pytest.raises(DatencoderError, match="train.max_grad_norm must be >= 0 and finite"):
        LoopConfig(work_dir="x", steps=1, batch_size=1, lr=1.0, max_grad_norm=float("nan"))


def _edit_concept(world, tmp_path, json_edit=None, tensor_edit=None) -> Path:
    """A copy of the concept, hand-edited; its JSON's tensor hash follows a tensor edit (a careful edit)."""
    out = tmp_path / "edited"
    out.mkdir()
    meta = json.loads((world["concept"] / "concept.json").read_text())
    tensors = load_tensors(world["concept"] / "concept.safetensors", "concept")
    if tensor_edit is not None:
        tensor_edit(tensors)
    # written directly: datencoder's own writer refuses non-finite tensors
    save_file(tensors, str(out / "concept.safetensors"), metadata={"datencoder.kind": "concept",
                                                                   "datencoder.format": "1"})
    meta["tensors_sha256"] = file_sha256(out / "concept.safetensors")
    if json_edit is not None:
        json_edit(meta)
    (out / "concept.json").write_text(json.dumps(meta))
    return out


def _first_factor(tensors) -> str:
    return next(k for k in sorted(tensors) if k.startswith("lora_B."))


EDITS = {
    "missing hard_word": (lambda m: m.pop("hard_word"), None, "concept.json: 'hard_word' is missing"),
    "blend as a string": (lambda m: m.update(blend_self="0.5"), None,
                          "concept.json: 'blend_self' is '0.5', not a finite number"),
    "NaN scale": (lambda m: m.update(scale=float("nan")), None, "concept.json: 'scale' is nan, not a finite number"),
    "blend out of range": (lambda m: m.update(blend_cross=3), None, "'blend_cross' is 3.0, outside [0, 1]"),
    "missing lora_B": (None, lambda t: t.pop(_first_factor(t)), "concept.safetensors lacks lora_B."),
    "NaN embedding": (None, lambda t: t["embedding"].__setitem__(0, float("nan")),
                      "concept.safetensors: tensor 'embedding' holds NaN"),
    "factor of the wrong rank": (None, lambda t: t.update({_first_factor(t): torch.zeros(4, 1)}),
                                 "not [r, in] and [out, r]"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_hand_edited_concept_is_one_line_naming_the_file(world, capsys, tmp_path, case):
    json_edit, tensor_edit, message = EDITS[case]
    edited = _edit_concept(world, tmp_path, json_edit, tensor_edit)
    msg = _error(capsys, ["generate", edited, "S*", "--out", tmp_path / "g"])
    assert message in msg and str(edited) in msg, msg
    assert message in _error(capsys, ["export", edited, "--out", tmp_path / "e"])
    assert not (tmp_path / "g").exists() and not (tmp_path / "e").exists()


def test_an_embedding_of_the_wrong_width_is_refused_before_sampling(world, capsys, tmp_path):
    edited = _edit_concept(world, tmp_path, tensor_edit=lambda t: t.update(embedding=torch.zeros(t["embedding"].numel() + 1)))
    msg = _error(capsys, ["generate", edited, "S*", "--out", tmp_path / "g"])
    assert f"concept {edited}: its embedding has width" in msg and "the base's text encoder takes" in msg


def test_an_encoder_whose_config_rank_differs_from_its_tensors_is_one_line(world, capsys, tmp_path):
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "encoder.safetensors").write_bytes((world["encoder"] / "encoder.safetensors").read_bytes())
    meta = json.loads((world["encoder"] / "encoder.json").read_text())
    meta["config"]["encoder"]["rank"] = meta["config"]["encoder"]["rank"] + 2
    (enc / "encoder.json").write_text(json.dumps(meta))
    msg = _error(capsys, ["personalize", world["image"], "--encoder", enc, "--out", tmp_path / "c"])
    assert f"encoder {enc}: encoder.json's config gives" in msg and "encoder.safetensors holds" in msg
    assert not (tmp_path / "c").exists()


def test_an_encoder_with_nan_weights_is_refused(world, capsys, tmp_path):
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "encoder.json").write_text((world["encoder"] / "encoder.json").read_text())
    state = load_tensors(world["encoder"] / "encoder.safetensors", "encoder")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, str(enc / "encoder.safetensors"), metadata={"datencoder.kind": "encoder", "datencoder.format": "1"})
    msg = _error(capsys, ["personalize", world["image"], "--encoder", enc, "--out", tmp_path / "c"])
    assert f"tensor '{name}' holds infinity" in msg


# -- non-finite values where they arise -----------------------------------------------------------
def test_a_diverging_tuning_stops_in_one_line_and_saves_nothing(world, capsys, tmp_path):
    msg = _error(capsys, _personalize(world, tmp_path / "c", "--steps", "3", "tune.lr_embedding=1e30"))
    assert "tuning diverged" in msg and "nothing was saved" in msg
    assert not (tmp_path / "c").exists()


def test_nothing_non_finite_is_ever_written(world, tmp_path):
    concept = Concept.load(world["concept"])
    concept.embedding[0] = float("nan")
    with pytest.raises(DatencoderError, match="tensor 'embedding' holds NaN; nothing non-finite is saved"):
        concept.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


N = 5
X = torch.randn(N, 3, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _mse(model, idx, gen):
    return {"loss": (model(X[idx]) ** 2).mean()}


def test_a_diverging_pretraining_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    work = tmp_path / "run"
    cfg = LoopConfig(work_dir=str(work), steps=20, batch_size=2, lr=1e30, max_grad_norm=0.0, checkpoint_every=1)
    with pytest.raises(DatencoderError, match=r"training diverged: the loss became inf at step \d+; stopped, "
                                              r"the last good checkpoint \(step \d+\) is kept") as info:
        fit(_model(), _mse, lambda i, p: i, N, cfg)
    assert "\n" not in str(info.value)
    ckpt = read_checkpoint(work)
    assert ckpt.meta["step"] >= 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt.prefixed("model.").values())


def test_weights_that_become_nan_are_never_checkpointed(tmp_path):
    work = tmp_path / "run"

    def poisoned(model, idx, gen):  # a finite loss whose gradient is NaN from the third step on
        loss = (model(X[idx]) ** 2).mean()
        if poisoned.calls >= 2:
            loss = loss + 0 * torch.sqrt(-model.bias.sum() - 1e3)  # sqrt(negative): NaN gradient, loss unchanged
        poisoned.calls += 1
        return {"loss": loss if torch.isfinite(loss) else loss.detach()}

    poisoned.calls = 0
    cfg = LoopConfig(work_dir=str(work), steps=6, batch_size=2, lr=0.01, max_grad_norm=0.0, checkpoint_every=1)
    with pytest.raises(DatencoderError, match="training diverged"):
        fit(_model(), poisoned, lambda i, p: i, N, cfg)
    assert all(bool(torch.isfinite(v).all()) for v in read_checkpoint(work).prefixed("model.").values())


# -- sizes against stated limits, before compute -----------------------------------------------------
def test_image_sizes_steps_and_counts_have_stated_limits(world, capsys, tmp_path):
    concept, out = world["concept"], tmp_path / "g"
    msg = _error(capsys, ["generate", concept, "S*", "--height", "100000", "--width", "100000", "--out", out])
    limit = 4 * world["resolution"]
    assert f"above this base's limit of {limit} per side" in msg and "it would need about" in msg and "GB" in msg
    assert "--num-images must be at most 10000" in _error(capsys, ["generate", concept, "S*", "--num-images",
                                                                   "100000", "--out", out])
    assert "--batch-size must be at most 64" in _error(capsys, ["generate", concept, "S*", "--batch-size", "1000",
                                                                "--out", out])
    assert "exceed the scheduler's 1000 training timesteps" in _error(capsys, ["generate", concept, "S*", "--steps",
                                                                              "100000", "--out", out])
    assert "tune.steps must be at most 1000" in _error(capsys, _personalize(world, tmp_path / "c", "--steps", "100000"))
    assert not out.exists() and not (tmp_path / "c").exists()


def test_memory_that_is_not_there_is_refused_with_the_estimate(world, capsys, tmp_path, monkeypatch):
    import datencoder.pipeline as pipeline

    monkeypatch.setattr(pipeline, "available_memory", lambda device: 1000)  # 1 kB free
    msg = _error(capsys, ["generate", world["concept"], "S*", "--out", tmp_path / "g"])
    assert "at once need about" in msg and "GB is free; use fewer pixels or a smaller batch" in msg


# -- the small cases -----------------------------------------------------------------------------------
def test_prompt_mistakes_are_one_line(world, capsys, tmp_path):
    out = ["--out", tmp_path / "g", "--base", world["base"]]
    assert "is a concept folder, but no prompt follows it" in _error(capsys, ["generate", world["concept"], *out])
    assert "uses the placeholder S* but no concept folder was given" in _error(capsys, ["generate", "a photo of S*",
                                                                                        *out])
    assert "the prompt is empty" in _error(capsys, ["generate", "  ", *out])
    assert "the prompt is empty" in _error(capsys, ["generate", world["concept"], "", *out])
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "-3"], "--guidance must be a finite number >= 0"),
    (["--lora-scale", "-1"], "--lora-scale must be in [0, 2]"),
    (["--lora-scale", "50"], "--lora-scale must be in [0, 2]"),
    (["--lora-scale", "nan"], "--lora-scale must be in [0, 2]"),
])
def test_odd_guidance_and_lora_scale_are_refused(world, capsys, tmp_path, flags, message):
    assert message in _error(capsys, ["generate", world["concept"], "S*", *flags, "--out", tmp_path / "g"])


def test_demo_checks_its_arguments_before_any_compute(world, capsys, tmp_path, monkeypatch):
    import datencoder.recipes.demo as demo

    monkeypatch.setattr(demo.EncoderSystem, "load", lambda *a, **k: pytest.fail("loaded a model"))
    enc = ["--encoder", world["encoder"]]
    assert "--sample-steps must be in [1, 1000], got 0" in _error(capsys, ["demo", *enc, "--sample-steps", "0"])
    assert "--out " in _error(capsys, ["demo", *enc, "--out", tmp_path / "grid"])
    assert "unknown image extension" in _error(capsys, ["demo", *enc, "--out", tmp_path / "grid"])
    assert "--guidance must be a finite number >= 0" in _error(capsys, ["demo", *enc, "--guidance", "-1"])


def test_partly_used_images_are_said(world, capsys, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="datencoder"):
        _ok(capsys, ["personalize", world["root"] / "animated.gif", "--encoder", world["encoder"],
                     "--out", tmp_path / "a", "--steps", "0"])
        _ok(capsys, ["personalize", world["root"] / "wide.png", "--encoder", world["encoder"],
                     "--out", tmp_path / "w", "--steps", "0"])
    text = caplog.text
    assert "animated.gif has 3 frames; using the first" in text
    assert "wide.png is 64x40; using its centre 40x40 square" in text


def test_python_dash_m_datencoder_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "datencoder", "generate", "-h"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    # -h says which defaults apply: the concept's sample config, else the stated ones
    help_text = " ".join(done.stdout.split())
    assert "sampling steps (default: the concept's; 25 without a concept)" in help_text
    assert "(default: the concept's; 7.5 without a concept)" in help_text


def test_default_threads_leave_a_busy_machine_alone():
    from datencoder.recipes.cli import default_threads

    assert default_threads(cores=2, load=2.1, torch_default=2) == 1  # a training runs: one thread
    assert default_threads(cores=2, load=0.1, torch_default=2) == 2  # idle: torch's default
    assert default_threads(cores=16, load=6.0, torch_default=8) == 8
    assert default_threads(cores=16, load=12.0, torch_default=8) == 4
