"""Shared by the CLI test files: the one-line error check and the tiny encoder config."""

from __future__ import annotations

from datencoder.config import Config
from datencoder.recipes import cli


def cli_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with exactly one 'error:' line (exit code 2), no traceback."""
    assert cli.main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def tiny_encoder_config(base_dir) -> Config:
    """An untrained encoder's config on a tiny base (its image tower has 2 layers)."""
    cfg = Config()
    cfg.model.pretrained = str(base_dir)
    cfg.encoder.tower_layers = [-1, -2]
    cfg.encoder.hidden_dim = 32
    return cfg
