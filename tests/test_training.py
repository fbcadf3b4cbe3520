"""The one training loop: data order, LR schedule, checkpoint format (and its legacy reader), EMA,
stop conditions, config validation. Toy models train in-process in about a second."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from datencoder.config import TrainConfig
from datencoder.emoji.minisd.config import MiniTrainConfig
from datencoder.errors import DatencoderError
from datencoder.training import (EMA, LoopConfig, StreamOrder, fit, load_ema_weights, lr_factor, read_checkpoint,
                                 shard_positions)
from datencoder.training.checkpoint import optimizer_tensors, write_checkpoint

N = 7  # examples in the toy data set (prime: epochs do not line up with batches)
X = torch.randn(N, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])


def _indices(indices, positions):
    return indices


def _loss(model, idx, gen):
    noise = 0.01 * torch.randn(len(idx), 1, generator=gen)
    mse = ((model(X[idx]) - Y[idx] - noise) ** 2).mean()
    return {"mse": mse, "half": 0.5 * mse}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _cfg(work, **kw) -> LoopConfig:
    return LoopConfig(**{"work_dir": str(work), "steps": 6, "batch_size": 3, "lr": 0.05, "warmup_steps": 2,
                         "log_every": 1, "ema_decay": 0.9, **kw})


def _checkpoint(work) -> dict[str, torch.Tensor]:
    return read_checkpoint(work).tensors


def test_order_is_a_pure_function_of_seed_and_position():
    a, b = StreamOrder(N, seed=3), StreamOrder(N, seed=3)
    ks = list(range(5 * N))
    forward = a.indices(ks)
    assert torch.equal(forward, b.indices(ks[::-1]).flip(0))  # no hidden state: any query order
    for epoch in range(5):  # every epoch is a permutation of the examples
        assert sorted(forward[epoch * N:(epoch + 1) * N].tolist()) == list(range(N))
    assert not torch.equal(forward[:N], forward[N:2 * N]) and not torch.equal(forward, StreamOrder(N, 4).indices(ks))


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (3, 2)])
def test_shards_are_disjoint_and_cover_the_stream(world, accum):
    batch, steps, start = 2, 3, 5
    per_rank = [[p for _, mb in zip(range(steps * accum), shard_positions(start, batch, accum, world, r)) for p in mb]
                for r in range(world)]
    union = sorted(p for rank in per_rank for p in rank)
    assert union == list(range(start, start + steps * batch * accum * world))  # disjoint and covering


def test_schedule_warms_up_then_stays_flat_or_decays():
    assert [lr_factor(s, 4, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 2, 10, "cosine") for s in range(11)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and all(x > y for x, y in zip(cosine[2:], cosine[3:]))
    assert cosine[10] == pytest.approx(0.0) and lr_factor(0, 0, 10) == 1.0


def test_ema_ramps_up_and_averages():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)  # past the warm-up: decay 0.5
    assert torch.allclose(ema.shadow["weight"], start + 0.5)
    copy = ema.copy_to(model)
    assert torch.equal(copy.weight, ema.shadow["weight"]) and not copy.training and copy is not model
    ema.update(model, step=0)  # warm-up: decay 1/10, nearly the model
    assert torch.allclose(ema.shadow["weight"], 0.1 * (start + 0.5) + 0.9 * (start + 1))


def test_resume_is_bit_identical_and_the_log_continues(tmp_path):
    straight = fit(_model(), _loss, _indices, N, _cfg(tmp_path / "a"))
    cut_cfg = _cfg(tmp_path / "b", checkpoint_every=2)
    first = fit(_model(), _loss, _indices, N, cut_cfg, max_steps=3)
    assert first.step == 3
    with pytest.raises(DatencoderError, match="--resume"):
        fit(_model(), _loss, _indices, N, cut_cfg)
    second = fit(_model(), _loss, _indices, N, cut_cfg, resume=True)
    assert straight.step == second.step == 6 and second.steps_this_run == 3
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and {"model.weight", "ema.weight", "optim.0.exp_avg", "rng.0.generator"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[0]["loss"] == pytest.approx(rows[0]["mse"] * 1.5)
    meta = read_checkpoint(tmp_path / "b").meta
    assert meta["position"] == 6 * 3 and meta["epoch"] == 18 // N


def test_checkpoint_round_trip_and_old_folder_fallback(tmp_path):
    tensors = {"model.w": torch.arange(4.0), "rng.0.generator": torch.zeros(3, dtype=torch.uint8)}
    write_checkpoint(tmp_path, tensors, {"step": 3, "position": 9})
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.meta["step"] == 3 and torch.equal(ckpt.tensors["model.w"], tensors["model.w"]) and not ckpt.legacy
    write_checkpoint(tmp_path, {"model.w": torch.ones(4)}, {"step": 5})
    assert read_checkpoint(tmp_path).meta["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")  # a crash between the swap's renames
    assert read_checkpoint(tmp_path).meta["step"] == 5
    assert torch.equal(load_ema_weights(tmp_path)["w"], torch.ones(4))  # no EMA kept: the model weights


def _write_legacy(work: Path, model: torch.nn.Module, step: int, epoch: int, offset: int) -> None:
    """The old minisd layout: top-level checkpoint.{json,safetensors}, scalars for the data order."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(X).sum().backward()
    optimizer.step()
    opt, groups = optimizer_tensors(optimizer)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"ema.{k}": v + 1 for k, v in model.state_dict().items()}, **opt}
    work.mkdir(parents=True)
    save_file(tensors, str(work / "checkpoint.safetensors"), metadata={"step": str(step)})
    (work / "checkpoint.json").write_text(json.dumps({
        "step": step, "train_seconds": 12.0, "data_epoch": epoch, "data_offset": offset, "optimizer_groups": groups,
        "noise_rng": torch.Generator().manual_seed(1).get_state().tolist(), "config": {"model": {"width": 3}}}))


def test_legacy_minisd_checkpoint_resumes_from_a_new_stream(tmp_path, caplog):
    work = tmp_path / "old"
    old = _model()
    _write_legacy(work, old, step=4, epoch=2, offset=5)
    ema = {k: v + 1 for k, v in old.state_dict().items()}
    assert all(torch.equal(load_ema_weights(work)[k], ema[k]) for k in ema)  # exports read the old layout
    assert read_checkpoint(work).legacy
    with caplog.at_level(logging.WARNING):
        converted = fit(_model(), _loss, _indices, N, _cfg(work, steps=4), resume=True)  # no step left: rewrite
    assert "new stream" in caplog.text and converted.step == 4 and converted.steps_this_run == 0
    new = read_checkpoint(work)  # the new layout now, beside the untouched old files
    assert not new.legacy and new.meta["position"] == 2 * N + 5 and new.meta["train_seconds"] == 12.0
    assert all(torch.equal(new.tensors[f"model.{k}"], v) for k, v in old.state_dict().items())
    assert all(torch.equal(new.tensors[f"ema.{k}"], v) for k, v in ema.items())
    assert new.meta["scheduler"]["last_epoch"] == 4
    result = fit(_model(), _loss, _indices, N, _cfg(work, steps=6), resume=True)
    assert result.step == 6 and result.steps_this_run == 2
    meta = read_checkpoint(work).meta
    assert meta["position"] == 2 * N + 5 + 2 * 3 and meta["train_seconds"] > 12.0
    assert (work / "checkpoint.json").is_file() and (work / "checkpoint" / "checkpoint.json").is_file()


def test_stop_file_time_budget_and_zero_steps(tmp_path):
    (tmp_path / "stop").mkdir()
    (tmp_path / "stop" / "STOP").touch()
    result = fit(_model(), _loss, _indices, N, _cfg(tmp_path / "stop"))
    assert result.step == 0 and read_checkpoint(tmp_path / "stop").meta["step"] == 0  # checkpointed anyway
    timed = fit(_model(), _loss, _indices, N, _cfg(tmp_path / "timed", max_minutes=1e-9))
    assert timed.step == 1  # the budget is checked before each step: one step ran
    model = _model()
    fit(model, _loss, _indices, N, _cfg(tmp_path / "zero", steps=0))  # writes the starting weights
    assert torch.equal(read_checkpoint(tmp_path / "zero").tensors["model.weight"], model.weight)


def test_bf16_autocast_and_sample_hook(tmp_path):
    seen = []
    fit(_model(), _loss, _indices, N, _cfg(tmp_path, mixed_precision="bf16", sample_every=4, steps=5),
        sample_fn=lambda m, step: seen.append((step, m.training, type(m).forward is m.forward.__func__)))
    assert seen == [(4, False, True), (5, False, True)]  # every 4 steps and at the end; plain eval copies


@pytest.mark.parametrize("key,value,match", [
    ("steps", -1, "train.steps"), ("batch_size", 0, "train.batch_size"), ("lr", 0.0, "train.lr"),
    ("ema_decay", 1.0, "train.ema_decay"), ("max_minutes", -1.0, "train.max_minutes"),
    ("warmup_steps", -2, "train.warmup_steps"), ("max_grad_norm", -1.0, "train.max_grad_norm"),
    ("log_every", 0, "train.log_every")])
def test_invalid_training_values_are_refused_in_one_line(key, value, match):
    for cls in (TrainConfig, MiniTrainConfig):
        if key in {f for f in cls.__dataclass_fields__}:
            with pytest.raises(DatencoderError, match=match) as err:
                cls(**{key: value})
            assert "\n" not in str(err.value)
    with pytest.raises(DatencoderError, match="train.grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(DatencoderError, match="train.steps"):
        TrainConfig(steps=0)  # pre-training needs a step; a minisd stage may run 0 (start from init_from)
    assert MiniTrainConfig(steps=0).loop().mixed_precision == "bf16"
