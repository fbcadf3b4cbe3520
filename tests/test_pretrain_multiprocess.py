"""Pre-training on several processes (issue 9, part 4): a real 2-process CPU run (gloo) through
``torchrun`` splits the data, writes from one process and resumes exactly; a launch whose processes
would each train alone is refused. Each launch starts two fresh interpreters (~50 s on the busy
2-core machine), hence slow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _launch(launcher: list[str], base, images, out, *extra, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [*launcher, "-m", "datencoder.recipes.cli", "pretrain", "tiny", f"model.pretrained={base}",
           f"data.root={images}", f"train.output_dir={out}", "train.steps=4", "train.checkpoint_every=2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


def _positions(output: str) -> dict[int, list[int]]:
    found = re.findall(r"process (\d)/2 reads stream positions \[([\d, ]+)\] at step", output)
    return {int(rank): [int(x) for x in listed.split(",")] for rank, listed in found}


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed beside python")
def test_two_process_cpu_run_splits_data_writes_once_and_resumes(tiny_base_dir, images, tmp_path):
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    cpu = {"ACCELERATE_USE_CPU": "1"}
    # the straight 4-step run and the first half of the cut run, side by side
    straight = _launch(torchrun, tiny_base_dir, images, tmp_path / "straight", env_extra=cpu)
    cut = _launch(torchrun, tiny_base_dir, images, tmp_path / "cut", "--max-steps", "2", env_extra=cpu)
    (rc_straight, out_straight), (rc_cut, out_cut) = _finish(straight), _finish(cut)
    assert rc_straight == 0, out_straight[-3000:]
    assert rc_cut == 0, out_cut[-3000:]

    # the data is split: each rank reads its own half of every global batch
    first = _positions(out_cut)
    assert sorted(first) == [0, 1] and not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == list(range(len(first[0]) * 2))
    per_step = len(first[0]) * 2
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["num_processes"] == 2 and ckpt["step"] == 2 and ckpt["position"] == 2 * per_step

    # only rank 0 writes: one log row per step, one summary line, no stray files
    assert _steps(tmp_path / "cut") == [1, 2]
    assert out_cut.count("pretrain: step 2/4") == 1
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint", "encoder", "log.jsonl"]

    rc, output = _finish(_launch(torchrun, tiny_base_dir, images, tmp_path / "cut", "--resume", env_extra=cpu))
    assert rc == 0, output[-3000:]
    resumed = _positions(output)
    assert resumed[0][0] == 2 * per_step and resumed[1][0] == 2 * per_step + len(first[0])
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "straight" / "encoder" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "cut" / "encoder" / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact under DDP


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch line is a real multi-GPU run")
@pytest.mark.skipif(not (BIN / "accelerate").exists(), reason="accelerate launcher not installed")
def test_launch_whose_processes_train_alone_is_refused(tiny_base_dir, images, tmp_path):
    """``accelerate launch --multi_gpu`` without GPUs: two processes that each see one process."""
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    rc, output = _finish(_launch(launcher, tiny_base_dir, images, tmp_path / "out"))
    assert rc != 0
    # both processes refuse; their lines share one stderr and may interleave, so count messages, not lines
    assert output.count("would train independently into one output folder") == 2, output
    assert "Traceback" not in output.split("error:")[0]
    assert not (tmp_path / "out" / "encoder").exists() and not (tmp_path / "out" / "checkpoint").exists()
