"""Every command once on a tiny base: the smoke subset CI also runs at the declared minimum versions.

``.ci/run`` installs exactly pyproject.toml's floors of diffusers, transformers, accelerate, peft
and safetensors in a second venv and runs the tests marked ``floor``: this file plus the stock
diffusers parity of the export and the gradient-checkpointing checks. The commands reach the
calls whose first releases set those floors: ``save_lora_weights(..., unet_lora_adapter_metadata=)``
(diffusers 0.34), ``from_pretrained(dtype=)`` (transformers 4.56),
``resize_token_embeddings(..., mean_resizing=False)`` (transformers 4.46) and activation
checkpointing in a frozen, eval-mode UNet (diffusers 0.32: its blocks gate on
``torch.is_grad_enabled()``, before on ``self.training``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datencoder.recipes import cli

pytestmark = pytest.mark.floor


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_pretrain_personalize_generate_export(family, tiny_clip_base_dir, tiny_sdxl_base_dir, tmp_path):
    base_dir = {"sd1": tiny_clip_base_dir, "sdxl": tiny_sdxl_base_dir}[family]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run, concept, generated, exported = (tmp_path / name for name in ("run", "concept", "generated", "exported"))

    assert cli.main(["pretrain", "tiny", f"model.pretrained={base_dir}", f"data.root={images}", "train.steps=2",
                     "train.gradient_checkpointing=true", f"train.output_dir={run}", "--device", "cpu"]) == 0
    assert cli.main(["personalize", str(images / "0.png"), "--encoder", str(run / "encoder"), "--out", str(concept),
                     "--steps", "2", "--device", "cpu", "tune.gradient_checkpointing=true"]) == 0
    assert cli.main(["generate", str(concept), "a photo of S* on the beach", "--num-images", "1", "--steps", "2",
                     "--out", str(generated), "--device", "cpu"]) == 0
    assert cli.main(["export", str(concept), "--out", str(exported)]) == 0

    assert (run / "encoder" / "encoder.safetensors").is_file()
    assert {"concept.json", "concept.safetensors"} <= {p.name for p in concept.iterdir()}
    image = np.asarray(Image.open(generated / "000.png"))
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.txt"} == {
        p.name for p in exported.iterdir()}
