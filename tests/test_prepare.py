"""Preparing a base (``prepare.prepare_base``): explicit, idempotent, and generation's import graph
stays free of the encoder stack."""

from __future__ import annotations

import ast
import subprocess
import sys

import torch

from datencoder.attention import DualPathProcessor
from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.pipeline import ConceptPipeline
from datencoder.prepare import prepare_base

ENCODER_STACK = ("datencoder.encoder", "datencoder.features", "datencoder.objective", "datencoder.system")


def test_generation_and_the_baselines_do_not_import_the_encoder_stack():
    """One fresh process (imports cost seconds): first generation, then the baselines on top."""
    code = ("import sys\n"
            "def loaded(): return sorted(m for m in sys.modules if m.startswith('datencoder'))\n"
            "import datencoder.pipeline\nprint(loaded())\n"
            "import datencoder.eval.baselines\nprint(loaded())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    generation, baselines = (ast.literal_eval(line) for line in out.strip().splitlines()[-2:])
    assert "datencoder.prepare" in generation
    assert [m for m in generation if m in ENCODER_STACK] == []
    assert "datencoder.tuning" in baselines  # the shared step loop, without the encoder
    assert [m for m in baselines if m in ENCODER_STACK and m != "datencoder.objective"] == []


def test_prepare_base_reports_its_changes_once(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    rows = base.text_encoder.get_input_embeddings().num_embeddings
    first = prepare_base(base, "<s*>")
    assert first.token_added and first.processors_installed and first.changed
    assert base.text_encoder.get_input_embeddings().num_embeddings == rows + 1
    assert all(isinstance(p, DualPathProcessor) for p in base.unet.attn_processors.values())
    assert not any(p.requires_grad for p in base.unet.parameters())
    again = prepare_base(base, "<s*>")
    assert not again.changed and again.token_id == first.token_id
    assert base.text_encoder.get_input_embeddings().num_embeddings == rows + 1


def test_concept_pipeline_prepares_the_callers_base_and_says_so(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    rows = base.text_encoder.get_input_embeddings().num_embeddings
    assert ConceptPipeline(base).prepared is None  # no concept: only frozen
    width = base.text_encoder.get_input_embeddings().weight.shape[1]
    concept = Concept(embedding=torch.zeros(width), factors={}, hard_word="dog",
                      base={"name": base.name, "fingerprint": base.fingerprint})
    pipe = ConceptPipeline(base, concept)
    assert pipe.prepared.token_added and pipe.prepared.processors_installed
    assert base.text_encoder.get_input_embeddings().num_embeddings == rows + 1  # the caller's table grew
    assert not ConceptPipeline(base, concept).prepared.changed
