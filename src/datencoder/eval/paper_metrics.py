"""The paper's metrics for real base models: CLIP-I, CLIP-T and DINO (METHOD.md, "Metrics").

- CLIP-I: cosine of the CLIP image embeddings of a generated image and the concept image;
- CLIP-T: cosine of the generated image's CLIP embedding and the prompt's, with S* replaced by the
  concept's class word ("S* on the beach" -> "dog on the beach"), as DreamBooth's DreamBench does;
- DINO: cosine of the CLS embeddings of a ``Dinov2Model``.

Models are transformers ``CLIPModel`` / ``Dinov2Model`` folders or hub ids (loaded with
``local_files_only`` when ``HF_HUB_OFFLINE`` is set). Images are preprocessed with Pillow and
torch as the model's ``preprocessor_config.json`` says (resize the shorter side, centre crop,
normalise), because transformers' image processors may need torchvision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DatencoderError
from ..io import to_pixels

__all__ = ["Preprocess", "ClipScorer", "DinoScorer", "PaperMetrics", "class_prompt", "METRIC_KEYS"]

log = logging.getLogger(__name__)

METRIC_KEYS = ("clip_i", "clip_t", "dino")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _side(value, default: int) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return default


@dataclass
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop``, normalise as the CLIP / DINO
    image processors do ((x / 255 - mean) / std)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_pretrained(cls, src: str, default_size: int, mean, std, default_resize: int | None = None) -> "Preprocess":
        from transformers.image_processing_utils import ImageProcessingMixin

        try:
            proc, _ = ImageProcessingMixin.get_image_processor_dict(src, local_files_only=_offline())
        except (OSError, ValueError):
            proc = {}
        crop = _side(proc.get("crop_size"), default_size) if proc.get("do_center_crop", True) else None
        resize = _side(proc.get("size"), default_resize or default_size)
        return cls(resize=resize, crop=crop or resize, mean=tuple(proc.get("image_mean", mean)),
                   std=tuple(proc.get("image_std", std)), resample=int(proc.get("resample", cls.resample)))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [N, 3, crop, crop] float32."""
        out = []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            scale = self.resize / min(w, h)
            size = (max(self.resize, round(w * scale)), max(self.resize, round(h * scale)))
            image = image.resize(size, self.resample)
            left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
            out.append(to_pixels(image))
        x = torch.stack(out)  # [N, 3, crop, crop] in [-1, 1]
        # the processors' (x01 - mean) / std with x01 = (x + 1) / 2, folded into one affine map
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 2 - 1
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 2
        return (x - mean) / std


def _load(cls, src: str, what: str):
    local = Path(src).expanduser()
    if not local.is_dir() and (local.exists() or src.startswith((".", "/", "~"))):
        raise DatencoderError(f"{what} model {src!r}: no such folder; give a {cls.__name__} folder or hub id")
    from transformers import AutoConfig

    from ..base import quiet_loading

    where = str(local) if local.is_dir() else src
    try:
        with quiet_loading():
            kind = AutoConfig.from_pretrained(where, local_files_only=_offline()).model_type
            # transformers would load another architecture's weights with a warning and random layers
            if kind != cls.config_class.model_type:
                raise ValueError(f"it holds a {kind!r} model, not {cls.config_class.model_type!r}")
            model = cls.from_pretrained(where, local_files_only=_offline())
    except (OSError, ValueError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DatencoderError(f"could not load the {what} model {src!r} as {cls.__name__}: {line}") from None
    return model.eval().requires_grad_(False)


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised) of a transformers ``CLIPModel``."""

    def __init__(self, src: str):
        from transformers import AutoTokenizer, CLIPModel

        self.model = _load(CLIPModel, src, "CLIP")
        size = self.model.config.vision_config.image_size
        self.preprocess = Preprocess.from_pretrained(src, size, _CLIP_MEAN, _CLIP_STD)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=_offline())
        except (OSError, ValueError) as err:
            raise DatencoderError(f"CLIP model {src!r} has no tokenizer: {str(err).splitlines()[0][:200]}") from None

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D] unit image embeddings."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit text embeddings (padded to the model's length: a batch equals its rows)."""
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


class DinoScorer:
    """CLS embeddings (L2-normalised) of a transformers ``Dinov2Model``."""

    def __init__(self, src: str):
        from transformers import Dinov2Model

        self.model = _load(Dinov2Model, src, "DINO")
        # DINOv2's own processor: shorter side 256, centre crop 224, ImageNet statistics
        self.preprocess = Preprocess.from_pretrained(src, 224, _IMAGENET_MEAN, _IMAGENET_STD, default_resize=256)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        cls = self.model(pixel_values=self.preprocess(images)).pooler_output  # [N, D]: layer-normed CLS token
        return F.normalize(cls.float(), dim=-1)


def class_prompt(prompt: str, placeholder: str, class_word: str) -> str:
    """The prompt CLIP-T compares with: S* replaced by the concept's class word."""
    if placeholder not in prompt:
        raise DatencoderError(f"prompt {prompt!r} has no placeholder {placeholder!r}")
    return prompt.replace(placeholder, class_word)


class PaperMetrics:
    """CLIP-I and CLIP-T (with a CLIP model) and DINO (with a DINOv2 model) of generated images."""

    def __init__(self, clip: str | None = None, dino: str | None = None):
        if clip is None and dino is None:
            raise DatencoderError("PaperMetrics needs a CLIP model, a DINO model, or both")
        self.clip = ClipScorer(clip) if clip else None
        self.dino = DinoScorer(dino) if dino else None

    def score(self, images: list[Image.Image], reference: Image.Image, prompts: list[str],
              class_word: str, placeholder: str = "S*") -> list[dict[str, float]]:
        """One dict per generated image (image i was made from prompt i)."""
        if len(images) != len(prompts):
            raise DatencoderError(f"{len(images)} images for {len(prompts)} prompts")
        out: list[dict[str, float]] = [{} for _ in images]
        if self.clip is not None:
            emb = self.clip.images(list(images) + [reference])  # [N + 1, D]
            text = self.clip.texts([class_prompt(p, placeholder, class_word) for p in prompts])  # [N, D]
            for i, (ci, ct) in enumerate(zip((emb[:-1] @ emb[-1]).tolist(), (emb[:-1] * text).sum(-1).tolist())):
                out[i].update(clip_i=round(ci, 5), clip_t=round(ct, 5))
        if self.dino is not None:
            emb = self.dino.images(list(images) + [reference])
            for i, d in enumerate((emb[:-1] @ emb[-1]).tolist()):
                out[i]["dino"] = round(d, 5)
        return out
