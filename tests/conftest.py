"""Shared pytest fixtures.

--- Foundation fixtures (base model, image I/O helper): keep these at the top. ---
The tiny base models are real diffusers-layout folders with random weights, built once per
session by ``datencoder.testing.build_tiny_base`` (well under a second each).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine oversubscribed
# threads make each step ~20x slower. Pinned, not defaulted: subprocesses inherit the variable,
# and the parity tests (printed README code against the library, CLI against the API) compare
# images made in two processes, whose float reductions must run on the same thread count (with
# OMP_NUM_THREADS=2 exported, the subprocess ran 2 threads against this process's 1 and the
# images differed by up to 120 grey levels).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from datencoder.testing import build_tiny_base  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """Tiny SD-family model with a BERT text encoder (like the MiniLM default)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "bert-base", seed=0, text_encoder="bert")


@pytest.fixture(scope="session")
def tiny_clip_base_dir(tmp_path_factory):
    """Tiny SD-family model with a CLIP text encoder (like Stable Diffusion 1.x)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "clip-base", seed=0, text_encoder="clip")


@pytest.fixture(scope="session")
def tiny_sd2_base_dir(tmp_path_factory):
    """Tiny SD 2.x-like model: v-prediction, linear attention projections, GELU CLIP text."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "sd2-base", seed=0, family="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_base_dir(tmp_path_factory):
    """Tiny SDXL-shaped model: two CLIP text encoders, the text_time added embedding."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "sdxl-base", seed=0, family="sdxl")

# --- Fixtures added by the method modules go below. ---
