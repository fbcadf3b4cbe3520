"""Outputs are never shared, mixed or lost: unique default folders, one writer per output, whole-folder
swaps that leave the old artifact or the new one (never a mix, never nothing), and a full or
read-only disk found before the compute or, at write time, as one line with nothing left behind.
CLI cases run in-process through ``cli.main`` on the tiny base; a full disk is simulated by making
the low-level write raise ENOSPC (a fault injection, not a model mock)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datencoder.io as dio
from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.config import TuneConfig
from datencoder.errors import DatencoderError
from datencoder.io import artifact_dir, atomic_dir, claim_output
from datencoder.recipes import cli
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize


from cli_helpers import cli_error as _error, tiny_encoder_config  # noqa: E402

@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    base = load_base(str(tiny_base_dir))
    cfg = tiny_encoder_config(tiny_base_dir)
    system = EncoderSystem(base, cfg)
    system.save(root / "encoder")
    for i in range(2):
        pixels = torch.rand(3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(i)) * 2 - 1
        personalize(system, pixels, TuneConfig(steps=0, seed=i)).save(root / f"concept{i}")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ok.png")
    return {"root": root, "base": tiny_base_dir, "encoder": root / "encoder", "image": root / "ok.png",
            "concept": root / "concept0", "other": root / "concept1"}




def _ok(capsys, argv) -> str:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out


def _personalize(world, out, *extra):
    return ["personalize", world["image"], "--encoder", world["encoder"], "--out", out, "--steps", "0", *extra]


def _leftovers(folder: Path) -> list[str]:
    """Temp files/folders and locks our writers may leave beside their outputs."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".lock", ".old")))


# -- generate's default folders ------------------------------------------------------------------
def test_default_generate_folders_are_never_shared(world, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["generate", "--base", world["base"], "--steps", "1", "--num-images", "1"]
    # different prompts with the same slug (emoji-only, punctuation-only) used to share outputs/prompt
    _ok(capsys, [*common, "🍎"])
    first = (tmp_path / "outputs" / "prompt" / "000.png").read_bytes()
    out = _ok(capsys, [*common, "!!!"])
    assert "outputs/prompt-2" in out
    assert (tmp_path / "outputs" / "prompt" / "000.png").read_bytes() == first  # the first run's image stays
    assert (tmp_path / "outputs" / "prompt-2" / "000.png").is_file()
    with claim_output(tmp_path / "outputs" / "prompt-3"):  # a run in progress holds -3: the next takes -4
        assert "outputs/prompt-4" in _ok(capsys, [*common, "???"])
    assert _leftovers(tmp_path) == []


# -- one writer per output -----------------------------------------------------------------------
def test_a_second_run_on_one_out_fails_at_once(world, capsys, tmp_path):
    out = tmp_path / "c"
    with claim_output(out):  # another live run (this process) is writing --out
        msg = _error(capsys, _personalize(world, out))
        assert "is being written by another datencoder run" in msg
        assert "is being written by another" in _error(capsys, ["export", world["concept"], "--out", out])
        assert "is being written by another" in _error(capsys, ["generate", world["concept"], "S*", "--out", out])
    assert not out.exists()
    _ok(capsys, _personalize(world, out))  # released: the next run may write
    assert _leftovers(tmp_path) == []


def test_a_dead_runs_lock_is_taken_over(world, capsys, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".c.lock").write_text(f"{socket.gethostname()} {int(gone.stdout)}")  # kill -9 left it
    _ok(capsys, _personalize(world, tmp_path / "c"))
    assert not (tmp_path / ".c.lock").exists()


# -- whole-folder swaps --------------------------------------------------------------------------
def test_a_kill_between_the_renames_keeps_the_old_concept(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "c"
    _ok(capsys, _personalize(world, out))
    before = (out / "concept.safetensors").read_bytes()
    real = os.replace

    def killed_after_the_first(src, dst):  # the process dies between replace_dir's two renames:
        if Path(dst) == out:  # the old folder went aside, the new one is not in yet
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(dio.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        Concept.load(out).save(out)
    monkeypatch.setattr(dio.os, "replace", real)
    assert not out.exists() and (tmp_path / ".c.old" / "concept.safetensors").read_bytes() == before
    assert artifact_dir(out) == tmp_path / ".c.old"
    assert Concept.load(out).hard_word  # found at .c.old, whole
    assert "already holds a concept" in _error(capsys, _personalize(world, out))  # still protected
    _ok(capsys, ["generate", out, "a photo of S*", "--steps", "1", "--num-images", "1", "--out", tmp_path / "g"])
    _ok(capsys, _personalize(world, out, "--overwrite", "--seed", "3"))
    assert out.is_dir() and not (tmp_path / ".c.old").exists()


def test_overwrite_swaps_the_concept_as_one_folder(world, capsys, tmp_path):
    out = tmp_path / "c"
    _ok(capsys, _personalize(world, out))
    _ok(capsys, _personalize(world, out, "--overwrite", "--seed", "1"))
    assert sorted(p.name for p in out.iterdir()) == ["concept.json", "concept.safetensors"]
    assert _leftovers(tmp_path) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert "holds notes.txt, which is not part of a concept" in _error(capsys, _personalize(world, mine))
    assert (mine / "notes.txt").read_text() == "my notes"


def test_a_failed_export_leaves_the_earlier_export_whole(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    _ok(capsys, ["export", world["concept"], "--out", out])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "already holds an export; pass --overwrite" in _error(capsys, ["export", world["other"], "--out", out])

    import datencoder.export as export

    def dies(*args, **kwargs):  # killed after the LoRA was written, before the embedding
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file_atomic", dies)
    assert cli.main([str(a) for a in ["export", world["other"], "--out", out, "--overwrite"]]) == 130  # interrupted
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, not a mix
    assert _leftovers(tmp_path) == []
    _ok(capsys, ["export", world["other"], "--out", out, "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    (out / "mine.txt").write_text("x")
    assert "holds mine.txt, which is not part of a concept export" in _error(
        capsys, ["export", world["concept"], "--out", out, "--overwrite"])


def test_atomic_dir_gives_the_usual_modes(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        fd = os.open(tmp / "sub" / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
        os.close(fd)
    assert (tmp_path / "d" / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_base_writes_usual_modes_and_refuses_replacing_without_overwrite(world, capsys, tmp_path):
    out = tmp_path / "eb"
    _ok(capsys, ["export-base", world["base"], "--out", out])
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}
    assert "already holds an exported base; pass --overwrite" in _error(capsys, ["export-base", world["base"],
                                                                               "--out", out])
    _ok(capsys, ["export-base", world["base"], "--out", out, "--overwrite"])


# -- read-only and full disks ----------------------------------------------------------------------
def _read_only(tmp_path) -> Path:
    if os.geteuid() == 0:  # permission bits do not stop root; a read-only sysfs does
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs to stand for a read-only location")
        return Path("/sys/kernel/datencoder-out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


@pytest.mark.parametrize("command", ["export", "export-base", "personalize", "generate"])
def test_read_only_output_is_one_line(world, capsys, tmp_path, command):
    target = _read_only(tmp_path)
    argv = {"export": ["export", world["concept"], "--out", target],
            "export-base": ["export-base", world["base"], "--out", target],
            "personalize": _personalize(world, target),
            "generate": ["generate", world["concept"], "S*", "--out", target]}[command]
    assert "cannot write to --out" in _error(capsys, argv)


shutil_usage = shutil._ntuple_diskusage  # (total, used, free), what shutil.disk_usage returns


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_safetensors(*args, **kwargs):  # what safetensors' Rust writer raises on a full tmpfs
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


@pytest.mark.parametrize("fault", [_no_space, _no_space_safetensors])
def test_full_disk_at_write_time_is_one_line_and_leaves_nothing(world, capsys, tmp_path, monkeypatch, fault):
    monkeypatch.setattr(dio, "save_file", fault)  # the low-level tensor write of datencoder.io
    msg = _error(capsys, _personalize(world, tmp_path / "c"))
    assert "could not write" in msg and "no space left on the device" in msg
    msg = _error(capsys, ["export", world["concept"], "--out", tmp_path / "exp"])
    assert "no space left on the device" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no concept, no export, no temp files, no locks


def test_full_disk_during_export_base_is_one_line(world, capsys, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)  # diffusers' save_pretrained writes with it
    msg = _error(capsys, ["export-base", world["base"], "--out", tmp_path / "eb"])
    assert "could not write" in msg and "no space left on the device" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_the_compute(world, capsys, tmp_path, monkeypatch):
    import datencoder.tuning as tuning

    monkeypatch.setattr(dio.shutil, "disk_usage", lambda path: shutil_usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(tuning, "optimise_on_image", lambda *a, **k: pytest.fail("tuned on a full disk"))
    msg = _error(capsys, _personalize(world, tmp_path / "c", "--steps", "1"))
    assert "free on its file system, the output needs about" in msg
    assert "free on its file system" in _error(capsys, ["export", world["concept"], "--out", tmp_path / "e"])
    assert "free on its file system" in _error(capsys, ["export-base", world["base"], "--out", tmp_path / "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_check_free_space_passes_with_room(tmp_path):
    dio.check_free_space(tmp_path / "x", 1000)
    with pytest.raises(DatencoderError, match="free on its file system"):
        dio.check_free_space(tmp_path / "x", 2**62)
