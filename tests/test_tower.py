"""The image tower of minisd-emoji: contrastive pieces, export format, and the shipped weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel

import datencoder
from datencoder.emoji.data import compose
from datencoder.emoji.tower import ContrastiveTower, TowerArch, clip_loss, retrieval_accuracy, save_tower

FIXTURES = Path(__file__).parent / "fixtures"
SHIPPED = Path(datencoder.__file__).parent / "assets" / "minisd-emoji" / "image_tower"


def test_clip_loss_prefers_matched_pairs():
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    scale = torch.tensor(10.0).log()
    assert clip_loss(text, text, scale) < clip_loss(text.roll(1, 0), text, scale)
    assert retrieval_accuracy(text, text) == {"top1": 1.0, "top5": 1.0}
    assert retrieval_accuracy(text.roll(1, 0), text)["top1"] == 0.0


def test_save_tower_writes_a_transformers_folder(tmp_path):
    arch = TowerArch(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    tower = ContrastiveTower(arch, text_dim=24).eval()
    save_tower(tower.vision, tmp_path / "tower", [0.5] * 3, [0.5] * 3)
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "tower").float().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = tower.vision(pixel_values=x).pooler_output
        out = loaded(pixel_values=x).pooler_output
    assert torch.allclose(out, ref, atol=0.02)  # fp16 storage
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "tower")
    assert processor.crop_size == {"height": 16, "width": 16}


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(),
                    reason="image tower not trained yet (datencoder minisd tower)")
def test_shipped_tower_gives_finite_features():
    assert (SHIPPED / "model.safetensors").stat().st_size <= 8 * 2**20
    model = CLIPVisionModel.from_pretrained(SHIPPED).float().eval()
    processor = CLIPImageProcessor.from_pretrained(SHIPPED)
    assert model.config.image_size == 64
    image = compose(Image.open(FIXTURES / "noto_1f34e.png"), "medium", "center", "blue")[0]
    pixels = processor(images=[image, image.convert("L").convert("RGB")], return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.pooler_output.shape == (2, model.config.hidden_size)
    assert torch.isfinite(out.pooler_output).all()
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1])
