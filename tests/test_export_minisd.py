"""The embedded default outside datencoder: the loading code its exports print runs as is.

A concept made on ``minisd-emoji`` is exported for diffusers, and the base is written as a
standalone pipeline folder (``export_base``). The code each README.txt prints (these two and the
shipped folder's own) is run verbatim in a
fresh process that never imports datencoder; its images must equal datencoder's own sampling of the
same prompt and seed (single path for the concept) within one grey level of 255. Left out, either
the tokenizer length (32, not the MiniLM package's 256) or the DDIM settings of the shipped
scheduler config would change every image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_export import _random_concept

from datencoder.base import DEFAULT_BASE, load_base
from datencoder.io import ASSETS
from datencoder.export import export_concept
from datencoder.export_base import assembly_readme, export_base
from datencoder.pipeline import ConceptPipeline

SHIPPED = ASSETS / DEFAULT_BASE
pytestmark = pytest.mark.skipif(not (SHIPPED / "unet").is_dir(), reason="minisd-emoji is not installed")

RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    for code, out in zip(sys.argv[1::2], sys.argv[2::2]):
        scope = {}
        exec(code, scope)
        np.save(out, np.asarray(scope["image"]))
    assert not any(name.startswith("datencoder") for name in sys.modules), "datencoder was imported"
""")


def _printed_code(readme: str) -> str:
    """The indented block after 'Load it:' (the README's code, exactly as printed)."""
    lines = readme.split("Load it:\n\n", 1)[1].split("\n")
    block = []
    for line in lines:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block)


def test_shipped_readme_is_current():
    # minisd export writes it; a change of the loading code must reach the shipped copy
    assert (SHIPPED / "README.txt").read_text() == assembly_readme(DEFAULT_BASE)


@pytest.mark.slow  # five 25-step generations of the 64-pixel default: about a minute on 2 CPU cores
def test_printed_code_reproduces_datencoder(tmp_path):
    base = load_base(DEFAULT_BASE, with_image_tower=False)
    standalone = export_base(base, tmp_path / "minisd-emoji-diffusers")  # before the concept adds its token
    concept = _random_concept(base, seed=8)
    exported = export_concept(concept, tmp_path / "concept-export")

    files = sorted(p.name for p in standalone.iterdir())
    assert {"model_index.json", "text_encoder", "tokenizer", "scheduler", "unet", "vae"} <= set(files)
    assert "datencoder_base.json" not in files
    scheduler = json.loads((standalone / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["clip_sample"] is False
    assert json.loads((standalone / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    assert load_base(str(standalone), with_image_tower=False).fingerprint == base.fingerprint  # usable as --base

    # the concept's export, the standalone folder, and the shipped folder's own README.txt
    codes = [_printed_code((folder / "README.txt").read_text()) for folder in (exported, standalone, SHIPPED)]
    assert "model_max_length=32" in codes[0] and "from_pretrained(" in codes[1]
    outs = [tmp_path / f"{i}.npy" for i in range(3)]
    done = subprocess.run([sys.executable, "-c", RUNNER, *(x for pair in zip(codes, map(str, outs)) for x in pair)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ours = ConceptPipeline(base, concept)("a photo of S* on the beach", num_images_per_prompt=1, seed=0,
                                          dual_path=False).images[0]
    plain = ConceptPipeline(base)("a cat", num_images_per_prompt=1, seed=0).images[0]
    for npy, image in zip(outs, (ours, plain, plain)):
        theirs, mine = np.load(npy).astype(int), np.asarray(image).astype(int)
        assert theirs.shape == mine.shape == (64, 64, 3)
        assert np.abs(theirs - mine).max() <= 1
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(plain).astype(int)).mean() > 5  # different images
