"""A small emoji recogniser used only to *measure* generated images.

It reads a 64x64 RGB image and predicts the concept, the rendering style, the background colour,
the position and the size of the emoji, and gives a normalised identity embedding (the features
that feed the concept head, so cosine similarity between two images tracks concept identity).
It is trained on every style and every concept of the emoji data set (held-out ones included:
it must recognise them when we measure personalisation on held-out concepts) and keeps a
validation split of its own so its accuracy on unseen images is known. No training path of the
method ever sees it.

The network first *canonicalises* its input, without parameters: the background colour is the
median of the outermost pixel ring, the emoji is the bounding box of pixels that differ from it,
and a square crop around that box is resampled to ``crop_size``. A ResNet-style CNN reads the crop
(concept, style, identity embedding); the background, position and size heads read the box and
the colour plus a small CNN on a downsampled view of the whole frame. Separating *what* from
*where* makes the concept branch translation- and scale-invariant by construction, which is what
lets a short CPU training reach usable accuracy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ..config import check_range, from_dict, to_dict
from ..errors import DatencoderError
from ..io import ASSETS, save_file_atomic, to_pixels, write_text_atomic

__all__ = ["EvaluatorArch", "EvaluatorNet", "Evaluator", "load_evaluator", "save_evaluator", "locate", "HEADS"]

logger = logging.getLogger(__name__)

HEADS = ("concept", "style", "background", "position", "size")
"""Classification heads, in the order the network returns them."""

DEFAULT_DIR = ASSETS / "evaluator"


@dataclass
class EvaluatorArch:
    """Shape of the evaluator network; stored in its config.json."""

    image_size: int = 64
    crop_size: int = 32
    """Side of the resampled emoji crop the concept branch reads."""
    detect_threshold: float = 0.25
    """A pixel belongs to the emoji when a channel differs from the background by more than this
    (images in [-1, 1], after a 3x3 mean filter that suppresses noise)."""
    detect_border: int = 2
    """Pixels at the frame edge ignored by detection: the data set keeps them free and VAE decoders
    smear colour there, which would otherwise stretch the box to the edge."""
    detect_min_pixels: int = 3
    """A row or column joins the box only with at least this many emoji pixels (drops specks)."""
    crop_margin: float = 0.08
    """Extra border around the detected box, as a fraction of its side."""
    stem_channels: int = 24
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """One residual stage per width on the crop; every stage halves the resolution."""
    blocks_per_stage: int = 1
    embed_dim: int = 128
    global_size: int = 32
    """The whole frame is area-downsampled to this side for the layout branch."""
    global_widths: list[int] = field(default_factory=lambda: [16, 32, 32])
    layout_hidden: int = 128
    concept_scale: float = 24.0
    """Temperature of the cosine concept classifier (logits = scale * cos)."""
    prototypes_per_concept: int = 0
    """0: the concept head is the trained cosine classifier. K > 0: it is K imprinted prototypes per
    concept (one per style: the mean embedding of that render's compositions), scored by the best
    match, so the head works like a nearest-render search."""
    prototype_style: bool = False
    """Prototype k of a concept belongs to style k mod (number of styles); the style score is then
    the best match over every prototype of that style (the style of the nearest render) instead
    of the trained style head. Several prototypes per style hold several views of the render
    (e.g. the composite itself and its reconstruction by the base model's VAE)."""

    def __post_init__(self) -> None:
        check_range(self, "model", ">= 1", "image_size", "crop_size", "stem_channels", "blocks_per_stage",
                    "embed_dim", "global_size", "layout_hidden")
        check_range(self, "model", ">= 0", "detect_threshold", "detect_border", "detect_min_pixels",
                    "crop_margin", "prototypes_per_concept")
        check_range(self, "model", "> 0", "concept_scale")
        for name in ("widths", "global_widths"):
            widths = getattr(self, name)
            if not widths or min(widths) < 1:
                raise DatencoderError(f"model.{name} must be a non-empty list of positive widths, got {widths}")


class _Block(nn.Module):
    """Basic residual block: two 3x3 convs with batch norm, projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


def _stages(cin: int, widths: list[int], blocks: int) -> nn.Sequential:
    stages = []
    for width in widths:
        stages += [_Block(cin, width, 2)] + [_Block(width, width, 1) for _ in range(blocks - 1)]
        cin = width
    return nn.Sequential(*stages)


@torch.no_grad()
def locate(x: torch.Tensor, threshold: float, border: int = 0,
           min_pixels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Background colour [B, 3] and a square box [B, 4] (x0, y0, x1, y1, pixels) around the emoji.

    x: [B, 3, H, W] in [-1, 1]. A frame with no foreground pixels gets the whole image as box.
    """
    x = x.float()
    b, _, h, w = x.shape
    ring = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)  # [B, 3, P]
    bg = ring.median(dim=2).values  # [B, 3]
    smooth = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    mask = (smooth - bg[:, :, None, None]).abs().amax(dim=1) > threshold  # [B, H, W]
    if border:
        inner = torch.zeros(h, w, dtype=torch.bool)
        inner[border : h - border, border : w - border] = True
        mask = mask & inner
    rows, cols = mask.sum(dim=2) >= min_pixels, mask.sum(dim=1) >= min_pixels  # [B, H], [B, W]
    found = rows.any(dim=1)
    y0 = rows.float().argmax(dim=1)
    y1 = h - 1 - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = w - 1 - cols.flip(1).float().argmax(dim=1)
    box = torch.stack([x0, y0, x1, y1], dim=1).float()
    full = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])
    box = torch.where(found[:, None], box, full)
    return bg, box


def _square_crop(x: torch.Tensor, box: torch.Tensor, margin: float, size: int) -> torch.Tensor:
    """Resample the square around each box to [B, 3, size, size]; outside pixels repeat the border."""
    b, _, h, w = x.shape
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) + 1
    side = side * (1 + 2 * margin)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2] = (2 * cx + 1) / w - 1  # pixel centre -> align_corners=False coordinates
    theta[:, 1, 2] = (2 * cy + 1) / h - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class EvaluatorNet(nn.Module):
    """Canonicalising CNN with five classification heads and an identity embedding."""

    def __init__(self, arch: EvaluatorArch, num_classes: dict[str, int]) -> None:
        super().__init__()
        missing = [h for h in HEADS if h not in num_classes]
        if missing:
            raise DatencoderError(f"evaluator needs class counts for heads {missing}")
        if arch.prototype_style and (arch.prototypes_per_concept % num_classes["style"] or not arch.prototypes_per_concept):
            raise DatencoderError("evaluator prototype_style needs prototypes_per_concept = a multiple of the styles")
        self.arch = arch
        self.stem = nn.Sequential(
            nn.Conv2d(3, arch.stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(arch.stem_channels),
            nn.ReLU(inplace=True),
        )
        self.stages = _stages(arch.stem_channels, arch.widths, arch.blocks_per_stage)
        width = arch.widths[-1]
        self.embed = nn.Linear(width, arch.embed_dim)
        self.concept = nn.Linear(arch.embed_dim, num_classes["concept"], bias=False)
        k = max(arch.prototypes_per_concept, 1)
        # Stored only when used, so training checkpoints of the classifier head stay unchanged.
        self.register_buffer("prototypes", torch.zeros(num_classes["concept"], k, arch.embed_dim),
                             persistent=arch.prototypes_per_concept > 0)
        self.style = nn.Linear(width, num_classes["style"])
        self.glob = _stages(3, arch.global_widths, 1)
        side = arch.global_size // 2 ** len(arch.global_widths)
        layout_in = 7 + arch.global_widths[-1] * side * side  # box (4) + colour (3) + flat map
        self.layout = nn.Sequential(nn.Linear(layout_in, arch.layout_hidden), nn.ReLU(inplace=True))
        self.background = nn.Linear(arch.layout_hidden, num_classes["background"])
        self.position = nn.Linear(arch.layout_hidden, num_classes["position"])
        self.size = nn.Linear(arch.layout_hidden, num_classes["size"])

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x: [B, 3, H, W] in [-1, 1] -> (logits per head, normalised embedding [B, embed_dim])."""
        a = self.arch
        with torch.autocast(x.device.type, enabled=False):
            bg, box = locate(x, a.detect_threshold, a.detect_border, a.detect_min_pixels)
            crop = _square_crop(x, box, a.crop_margin, a.crop_size)  # [B, 3, crop, crop]
            small = F.interpolate(x.float(), size=(a.global_size, a.global_size), mode="area")
        feat = self.stages(self.stem(crop)).mean(dim=(2, 3))  # [B, width]
        emb = F.normalize(self.embed(feat), dim=-1)  # [B, D]
        # Cosine classifier: the concept decision is a nearest-prototype search in embedding
        # space, which is what makes the embedding a usable identity similarity.
        style = self.style(feat)
        if a.prototypes_per_concept > 0:
            c, k, d = self.prototypes.shape
            sims = (emb @ self.prototypes.reshape(c * k, d).t()).view(-1, c, k)  # [B, C, K]
            cos = sims.amax(dim=-1)  # [B, C]
            if a.prototype_style:
                views = sims.view(len(sims), c, -1, style.shape[1])  # [B, C, K / styles, styles]
                style = a.concept_scale * views.amax(dim=(1, 2))  # [B, styles]
        else:
            cos = emb @ F.normalize(self.concept.weight, dim=-1).t()  # [B, C]
        geometry = torch.cat([box / (x.shape[-1] - 1) * 2 - 1, bg], dim=1)  # [B, 7]
        layout = self.layout(torch.cat([geometry, self.glob(small).flatten(1)], dim=1))
        logits = {
            "concept": a.concept_scale * cos,
            "style": style,
            "background": self.background(layout),
            "position": self.position(layout),
            "size": self.size(layout),
        }
        return logits, emb


def images_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] float in [-1, 1]; transparency is composited on white."""
    arrays = []
    for img in images:
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    return to_pixels(np.stack(arrays))  # [N, 3, H, W]


class Evaluator:
    """Inference wrapper: label lists plus the network, in eval mode, fp32."""

    def __init__(self, net: EvaluatorNet, labels: dict[str, list[str]], names: dict[str, str] | None = None,
                 metadata: dict | None = None) -> None:
        self.net = net.eval()
        self.labels = labels
        self.names = names or {}
        """Concept id -> human-readable name (e.g. '1f34e' -> 'red apple')."""
        self.metadata = metadata or {}
        self.index = {head: {label: i for i, label in enumerate(ls)} for head, ls in labels.items()}

    @property
    def image_size(self) -> int:
        return self.net.arch.image_size

    @torch.no_grad()
    def logits(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256):
        """Raw logits per head and embeddings; accepts PIL images or a [-1, 1] tensor."""
        x = images if torch.is_tensor(images) else images_to_tensor(images, self.image_size)
        outs, embs = [], []
        for start in range(0, len(x), batch_size):
            logits, emb = self.net(x[start : start + batch_size].float())
            outs.append(logits)
            embs.append(emb)
        merged = {h: torch.cat([o[h] for o in outs]) for h in HEADS}
        return merged, torch.cat(embs)

    def predict(self, images: list[Image.Image] | torch.Tensor) -> dict[str, dict]:
        """Per head: {'labels': top-1 label per image, 'probs': [N, num_classes] probabilities}."""
        logits, _ = self.logits(images)
        result = {}
        for head in HEADS:
            probs = logits[head].softmax(dim=-1)
            top = probs.argmax(dim=-1).tolist()
            result[head] = {"labels": [self.labels[head][i] for i in top], "probs": probs}
        return result

    def embed(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Identity embeddings, L2-normalised: [N, embed_dim]."""
        return self.logits(images)[1]


def save_evaluator(net: EvaluatorNet, labels: dict[str, list[str]], out_dir: str | Path,
                   names: dict[str, str] | None = None, metadata: dict | None = None) -> Path:
    """Write model.safetensors (fp16) and config.json atomically into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()
             if v.is_floating_point()}
    # BatchNorm's integer step counter is not needed at inference and is dropped.
    config = {"arch": to_dict(net.arch), "labels": labels, "names": names or {}, "metadata": metadata or {}}
    save_file_atomic(out / "model.safetensors", state)
    write_text_atomic(out / "config.json", json.dumps(config, indent=1))
    return out


SHIPPED_EVALUATORS = ("evaluator", "evaluator_world")


def evaluator_folder(path: str | Path | None = None) -> Path:
    """The folder of a shipped evaluator's name (None: the default one), else the path itself."""
    if path is None:
        return DEFAULT_DIR
    return DEFAULT_DIR.parent / str(path) if str(path) in SHIPPED_EVALUATORS else Path(path)


def load_evaluator(path: str | Path | None = None) -> Evaluator:
    """Load the shipped evaluator (``assets/evaluator``), the world's (``"evaluator_world"``: the
    world's concepts, read through the base's VAE) or one saved with ``save_evaluator``."""
    folder = evaluator_folder(path)
    weights, cfg_file = folder / "model.safetensors", folder / "config.json"
    if not weights.exists() or not cfg_file.exists():
        raise DatencoderError(
            f"no evaluator weights in {folder}; train them with `datencoder minisd evaluator minisd_evaluator`"
        )
    config = json.loads(cfg_file.read_text())
    arch = from_dict(EvaluatorArch, config["arch"])
    labels = config["labels"]
    net = EvaluatorNet(arch, {h: len(labels[h]) for h in HEADS})
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    # Only BatchNorm's num_batches_tracked buffers may be absent (see save_evaluator).
    bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if bad:
        raise DatencoderError(f"evaluator weights in {folder} do not match its config.json: {bad[:3]}")
    return Evaluator(net, labels, config.get("names"), config.get("metadata"))
