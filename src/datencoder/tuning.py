"""Personalisation: the encoder's prediction, then a few tuning steps on the one image.

METHOD.md, "Tuning": the embedding v and the low-rank factors, initialised from the encoder,
are optimised with Adam for N <= 12 steps on a batch of augmented copies of the image, with
the dual path on. With ``tune.tune_heads`` copies of the encoder's embedding head and of the
hypernetwork's per-sample maps (``TuningEncoder.tunable_heads``) are tuned instead, on the image's
fixed trunk features, and v and the factors are their output. With 0 steps the result is exactly
the encoder's prediction.

``optimise_on_image`` is the one step loop on one image; the baselines (Textual Inversion,
DreamBooth-LoRA, ``eval/baselines.py``) run it too, so every method is optimised alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .augment import augment_views
from .concept import Concept
from .config import DataConfig, TuneConfig, to_dict
from .cost import cost_info, measure, peak_memory_mb
from .dataset import template_fields
from .errors import DatencoderError

if TYPE_CHECKING:  # the baselines import this module without the encoder stack
    from .base import BaseModel
    from .objective import Objective
    from .system import EncoderSystem

__all__ = ["personalize", "optimise_on_image", "peak_memory_mb"]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
Trainables = Callable[[], tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]]
"""Returns the step's (embedding [1, D], factors {key: (A [1, r, in], B [1, out, r])}); called once per
step, so trained heads can recompute them from their parameters."""


def check_tunable(base: BaseModel) -> None:
    """Refuse to tune through a float16 base: without loss scaling its small gradients underflow."""
    if base.dtype == torch.float16:
        raise DatencoderError("tuning through a float16 base is not supported (no loss scaling: small gradients "
                              "underflow); load the base in bf16 (--dtype bf16) or fp32")


def tuning_data(cfg) -> DataConfig:
    """cfg.data with the tuning steps' templates (tune.templates when set)."""
    templates = cfg.tune.templates or cfg.data.templates
    fields = template_fields(templates)
    if fields:
        raise DatencoderError(f"the prompt templates name manifest fields {sorted(fields)}, which a single image has "
                              "not; set tune.templates to plain templates (e.g. tune.templates='[\"S*\"]')")
    return dataclasses.replace(cfg.data, templates=list(templates))


def optimise_on_image(objective: Objective, base: BaseModel, pixels: Tensor, steps: Iterable[int],
                      batch_size: int, data: DataConfig, trainables: Trainables, dual_path: bool,
                      optimizer: torch.optim.Optimizer | None, generator: torch.Generator,
                      callback: StepCallback | None = None) -> None:
    """The step loop on one image ([3, H, W] in [-1, 1]): per step, ``batch_size`` augmented views,
    their latents noised at random timesteps, one random template of ``data.templates`` per view,
    the objective's terms, then backward and ``optimizer.step()`` (None: losses only).

    Every random draw comes from ``generator``, in this order, so one seed gives one result.
    ``steps`` numbers the steps for ``callback(step, {"loss": ..., term: ...})``; a continued run
    passes ``range(done, total)``.
    """
    if optimizer is not None:
        check_tunable(base)
    templates = data.templates
    for step in steps:
        embedding, factors = trainables()
        views = augment_views(pixels, batch_size, generator, data.hflip, data.scale_min)  # [b, 3, H, W]
        batch = objective.add_noise(base.encode_latents(views, generator), generator)
        picks = torch.randint(0, len(templates), (batch_size,), generator=generator).tolist()
        terms = objective(batch, [templates[i] for i in picks], embedding, factors, dual_path, generator)
        loss = sum(terms.values())
        if not torch.isfinite(loss.detach()):
            raise DatencoderError(f"tuning diverged: the loss became {float(loss.detach())} at step {step + 1}; "
                                  "nothing was saved; lower the learning rates (tune.lr_embedding, tune.lr_lora)")
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if callback is not None:
            callback(step, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}})


def personalize(system: EncoderSystem, pixels: Tensor, tune: TuneConfig | None = None,
                callback: StepCallback | None = None, info: dict | None = None) -> Concept:
    """pixels: [3, H, W] in [-1, 1] at the base resolution -> a concept artifact.

    Runs on the system's device; the tuned tensors (v, A, B) are fp32 whatever the base's dtype.
    Randomness comes from one CPU generator, so a seed gives the same draws on every device.
    """
    cfg = system.cfg
    tune = tune or cfg.tune
    if tune.steps > 0:
        check_tunable(system.base)
    gen = torch.Generator().manual_seed(tune.seed)
    pixels = pixels.to(system.device, torch.float32)
    with _gradient_checkpointing(system.base.unet, tune.gradient_checkpointing):
        return _personalize(system, pixels, tune, gen, callback, info)


@contextmanager
def _gradient_checkpointing(unet, enabled: bool) -> Iterator[None]:
    """Switch diffusers' activation checkpointing on for the block, then restore the previous state."""
    was = unet.is_gradient_checkpointing
    if enabled and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not was:
            unet.disable_gradient_checkpointing()


def _predict(system: EncoderSystem, pixels: Tensor, tune: TuneConfig, gen: torch.Generator):
    """The encoder's prediction: (embedding [1, D], factors, the tuned head tensors or None, their input h)."""
    features = system.predict_features(pixels.unsqueeze(0), gen)
    encoder, heads, h = system.encoder, None, None
    with torch.no_grad():
        if tune.tune_heads:
            # copies of the tuned tensors only (encoder.tunable_heads): the shared encoder serves
            # every other image unchanged
            heads = encoder.tunable_heads(tune.tune_embedding, tune.tune_lora) if tune.steps > 0 else {}
            h = encoder.hidden(*features)  # [1, hidden]: the image's features stay fixed
            pred = encoder.heads(h)
        else:
            pred = encoder(*features)
    embedding = pred.embedding.detach().clone()  # [1, D]
    factors = {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in pred.factors.items()}
    return embedding, factors, heads, h


def _tune(system: EncoderSystem, pixels: Tensor, tune: TuneConfig, gen: torch.Generator,
          callback: StepCallback | None, embedding: Tensor, factors: dict, heads, h):
    """``tune.steps`` steps from the prediction; the tuned (embedding, factors)."""
    cfg = system.cfg
    encoder = system.encoder
    groups = []
    if heads is not None:
        if heads:
            groups.append({"params": list(heads.values()), "lr": tune.lr_heads})
    else:
        embedding.requires_grad_(tune.tune_embedding)
        if tune.tune_embedding:
            groups.append({"params": [embedding], "lr": tune.lr_embedding})
        if tune.tune_lora and factors:
            lora = [t.requires_grad_() for pair in factors.values() for t in pair]
            groups.append({"params": lora, "lr": tune.lr_lora})
    optimizer = torch.optim.Adam(groups) if groups else None
    if heads is not None:
        def trainables():
            out = encoder.heads(h, heads)
            return out.embedding, out.factors
    else:
        def trainables():
            return embedding, factors
    optimise_on_image(system.objective, system.base, pixels, range(tune.steps), tune.batch_size,
                      tuning_data(cfg), trainables, cfg.dual_path.enabled, optimizer, gen, callback)
    if heads is not None:
        with torch.no_grad():
            out = encoder.heads(h, heads)
        embedding, factors = out.embedding, out.factors
    return embedding, factors


def _personalize(system: EncoderSystem, pixels: Tensor, tune: TuneConfig, gen: torch.Generator,
                 callback: StepCallback | None, info: dict | None) -> Concept:
    cfg = system.cfg
    with measure(system.device) as predicting:
        embedding, factors, heads, h = _predict(system, pixels, tune, gen)
    with measure(system.device) as tuning:
        if tune.steps > 0:
            embedding, factors = _tune(system, pixels, tune, gen, callback, embedding, factors, heads, h)
    tensors = {"embedding": embedding, **{f"lora_{k}": t for k, pair in factors.items() for t in pair}}
    if not all(bool(torch.isfinite(t.detach()).all()) for t in tensors.values()):
        raise DatencoderError(f"tuning diverged: the tuned tensors hold NaN or infinity after {tune.steps} steps; "
                              "nothing was saved; lower the learning rates (tune.lr_embedding, tune.lr_lora)")

    hard_word = system.objective.hard_words(embedding.detach())[0]
    timings = {"steps": tune.steps, **cost_info(predicting, tuning)}
    log.debug("encoder %.2fs, %d tuning steps %.2fs, nearest word %r", timings["encoder_s"], tune.steps,
             timings["tuning_s"], hard_word)
    dp = cfg.dual_path
    return Concept(
        embedding=embedding.detach()[0].cpu().clone(),
        factors={k: (A.detach()[0].cpu().clone(), B.detach()[0].cpu().clone()) for k, (A, B) in factors.items()},
        hard_word=hard_word, placeholder=cfg.model.placeholder, token=cfg.model.token,
        blend_self=dp.blend_self if dp.enabled else 1.0, blend_cross=dp.blend_cross if dp.enabled else 1.0,
        pooled=dp.pooled,
        scale=cfg.encoder.lora_scale, base={"name": system.base.name, "fingerprint": system.base.fingerprint},
        # the settings it was tuned with: ``tune`` (the call's) may differ from the system's cfg.tune
        config={**to_dict(cfg), "tune": to_dict(tune)}, info={**(info or {}), **timings},
        token_dims=system.base.token_dims,
    )
