"""Encoder pre-training (METHOD.md: "an encoder is pre-trained once, on a large diverse image set").

Builds the frozen base, the ``EncoderSystem`` and the image stream, and runs the one training loop
(``datencoder.training.fit``): one CPU process or ``accelerate launch`` on several GPUs, the frozen
base on each process's device, only the encoder optimised (DDP-wrapped). Stream position k is image
``perm(seed, k // N)[k % N]`` with augmentation and template drawn from a generator seeded by
(seed, k); ``resume=True`` continues bit-identically. With ``data.pair_by`` an item is a pair: the
encoder sees one render and the loss reconstructs another render of the same concept (its partner
drawn by the same generator), under a prompt that names what the two do not share.

Output folder: ``log.jsonl`` (loss terms, and ``health_distinct_nearest`` / ``health_top_word_share``
of the window's predicted embeddings, so an encoder collapse shows while it happens),
``checkpoint/`` (``datencoder.training`` format), ``samples/step_XXXXXX.png`` and the final
``encoder/`` (``EncoderSystem.save``, with the resolved config).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import SHIPPED_BASES, load_base
from .config import Config, to_dict
from .dataset import ImageFolderDataset, template_fields
from .errors import DatencoderError
from .health import nearest_word_stats
from .image_io import make_grid, save_image_atomic
from .io import check_output, to_pil
from .pipeline import ConceptPipeline
from .system import EncoderSystem
from .training import check_resume, fit, make_accelerator, mix
from .tuning import personalize

__all__ = ["pretrain", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    steps_this_run: int
    seconds_per_step: float
    final_loss: float
    output_dir: Path
    is_main: bool


@torch.no_grad()
def _sample_grid(system: EncoderSystem, dataset: ImageFolderDataset, cfg: Config, path: Path) -> None:
    """Rows: fixed training images; columns: the image, then one generation per prompt."""
    n = min(cfg.train.sample_concepts, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    tune = dataclasses.replace(cfg.tune, steps=0)  # the encoder's own prediction, no tuning
    images, labels = [], []
    device = system.base.unet.device
    for index in indices:
        pixels = dataset.clean(index)
        concept = personalize(system, pixels.to(device), tune)
        pipe = ConceptPipeline(system.base, concept, cfg.sample.scheduler)
        images.append(to_pil(pixels))
        labels.append(f"#{index} ~{concept.hard_word}")
        images += pipe(cfg.train.sample_prompts, num_images_per_prompt=1, num_inference_steps=cfg.sample.steps,
                       guidance_scale=cfg.sample.guidance, seed=cfg.sample.seed).images
        labels += cfg.train.sample_prompts
    save_image_atomic(make_grid(images, cols=1 + len(cfg.train.sample_prompts), labels=labels), path)


class _Items:
    """(example indices, stream positions) -> (pixels [B, 3, H, W], prompts); picklable for workers."""

    def __init__(self, dataset: ImageFolderDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __call__(self, indices: torch.Tensor, positions: torch.Tensor):
        read = self.dataset.pair_item if self.dataset.paired else self.dataset.item
        items = [read(int(i), torch.Generator().manual_seed(mix(self.seed, "item", int(k))))
                 for i, k in zip(indices, positions)]
        if self.dataset.paired:  # (inputs, targets, prompts): the loss reconstructs the targets
            return (torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items]),
                    [item[2] for item in items])
        return torch.stack([pixels for pixels, _ in items]), [prompt for _, prompt in items]


def pretrain(cfg: Config, resume: bool = False, max_steps: int | None = None,
             device: str | None = None) -> TrainResult:
    """Pre-train (or continue) the encoder described by ``cfg``; returns the run's summary.

    ``device`` "cpu" forces the CPU; otherwise accelerate places each process (CUDA when present).
    """
    from accelerate.utils import set_seed

    tc = cfg.train
    if not cfg.model.pretrained:
        raise DatencoderError("model.pretrained is empty; pass model.pretrained=FOLDER_OR_HUB_ID")
    named = sorted(template_fields(cfg.data.templates))
    if named and cfg.tune.templates is None:  # else the saved encoder could not personalise one image
        raise DatencoderError(f"data.templates name manifest fields {named}, and tune.templates is unset, so "
                              "personalising with this encoder would use them; set tune.templates to plain "
                              "templates (e.g. tune.templates='[\"S*\"]')")
    out = Path(tc.output_dir)
    check_resume(out, resume)
    check_output(out, "train.output_dir")
    for key in ("pretrained", "image_tower"):  # the saved encoder must not depend on the working directory
        value = getattr(cfg.model, key)
        if value and value not in SHIPPED_BASES and Path(value).expanduser().is_dir():
            setattr(cfg.model, key, str(Path(value).expanduser().resolve()))

    loop = tc.loop(cfg.data.num_workers)
    # started first: a launch whose processes would each train alone fails before any loading
    accelerator = make_accelerator(loop, cpu=device is not None and torch.device(device).type == "cpu")
    set_seed(tc.seed)  # encoder initialisation
    d = cfg.data  # scanned first: a bad data path fails before a large model is loaded
    dataset = ImageFolderDataset(d.root, d.resolution, d.templates, d.extensions, d.manifest, d.splits,
                                 d.use_source, d.hflip, d.scale_min, d.categories, d.pair_by, d.pair_input)
    # The frozen base is held in train.base_dtype (bf16/fp16 halves its memory); autocast runs the
    # matmuls in train.mixed_precision; the encoder's master weights and AdamW state stay fp32.
    base = load_base(cfg.model.pretrained, cfg.model.image_tower, revision=cfg.model.revision,
                     variant=cfg.model.variant, torch_dtype=tc.base_dtype, device=accelerator.device)
    if tc.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    dataset.resolution = d.resolution or base.resolution
    system = EncoderSystem(base, cfg)
    encoder = system.encoder
    nearest: list[int] = []  # this process's nearest words since the last log row (collapse watch)

    def loss_fn(model, batch, generator):
        pixels, *targets, prompts = batch
        system.encoder = model
        target = targets[0].to(accelerator.device) if targets else None
        terms, pred = system.training_step(pixels.to(accelerator.device), list(prompts), generator, target)
        nearest.extend(system.objective.nearest(pred.embedding)[0][:, 0].tolist())  # the hard words' rows
        return terms

    def health() -> dict[str, float]:
        stats = {f"health_{k}": v for k, v in nearest_word_stats(nearest).items()}
        nearest.clear()
        return stats

    def sample_fn(model, step):
        system.encoder = model
        _sample_grid(system, dataset, cfg, out / "samples" / f"step_{step:06d}.png")

    result = fit(encoder, loss_fn, _Items(dataset, tc.seed), len(dataset), loop, resume=resume, max_steps=max_steps,
                 sample_fn=sample_fn, log_columns=health, meta={"config": to_dict(cfg)}, accelerator=accelerator)
    system.encoder = encoder
    if result.is_main:
        system.save(out / "encoder", {"step": result.step, "complete": result.step >= tc.steps,
                                      "epoch": result.epoch,
                                      "final_loss": result.final_loss, "images": len(dataset)})
    return TrainResult(result.step, result.steps_this_run, result.seconds_per_step, result.final_loss, out,
                       result.is_main)
