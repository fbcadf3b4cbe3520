"""Generation with a concept: a thin layer over diffusers' StableDiffusionPipeline (SDXL:
StableDiffusionXLPipeline, with the pooled text of each prompt as ``pooled_prompt_embeds``).

The soft prompt (S* -> the concept's embedding) goes in as ``prompt_embeds``; the hard prompt
(S* -> the nearest real word) and the low-rank factors travel to the dual-path processors
through ``cross_attention_kwargs``, so the sampler is diffusers' own and sampling is the exact
dual-path model the concept was tuned with. Without a concept it is the plain base model.
A call takes diffusers' arguments and returns a ``ConceptPipelineOutput`` (``.images``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from diffusers.utils import BaseOutput
from PIL import Image

from .attention import AdapterInputs, uses_dual_path
from .base import BaseModel
from .concept import Concept
from .conditioning import TextStates, encode_text, pooled_text
from .config import check_seed
from .errors import DatencoderError
from .prepare import BasePreparation, prepare_base
from .tokens import check_placeholder_kept, fill_placeholder, hard_prompts

__all__ = ["ConceptPipeline", "ConceptPipelineOutput"]

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE_FACTOR = 4
"""Image sides are at most this many times the base's resolution."""


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors: the GPU's free memory, or MemAvailable of the host (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def progress_callback(bar):
    """A ``callback_on_step_end`` that calls ``bar.update(1)`` after each sampling step (a tqdm bar)."""
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        bar.update(1)
        return callback_kwargs
    return on_step_end


@dataclass
class ConceptPipelineOutput(BaseOutput):
    """What ``ConceptPipeline(...)(...)`` returns (``return_dict=True``), as diffusers' pipeline
    outputs: ``out.images``, ``out["images"]`` or ``out[0]`` (``out[0]`` is all the images, not the
    first one: the first image is ``out.images[0]``)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    """``prompts x num_images_per_prompt`` images, prompt-major (all of the first prompt's images,
    then the second's): PIL images (``output_type="pil"``), an array [N, H, W, 3] in [0, 1] ("np"),
    a tensor [N, 3, H, W] in [0, 1] ("pt"), or the final latents [N, C, H/f, W/f] ("latent")."""


class ConceptPipeline:
    """Images from a concept (or from the plain base without one) with diffusers' sampler, called
    like a diffusers pipeline::

        pipe = ConceptPipeline(base, concept)
        images = pipe("a photo of S* on the beach", num_images_per_prompt=4,
                      generator=torch.Generator().manual_seed(0)).images

    Constructing it changes ``base`` IN PLACE, through ``prepare.prepare_base``: the base is frozen
    (eval mode, no gradients) and, with a concept, its token is added to every tokenizer (the
    text encoders' embedding tables grow by one row) and the dual-path processors are installed on
    every UNet attention layer. Each change is made once (``self.prepared`` says which this
    pipeline made; None without a concept); the processors are the vanilla attention for calls
    without the concept's inputs, so the base still generates as before, but a caller that needs
    the untouched objects should pass a copy (or restore with ``attention.remove_processors``).
    """

    def __init__(self, base: BaseModel, concept: Concept | None = None, scheduler: str = "ddim"):
        if scheduler not in SCHEDULERS:
            raise DatencoderError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        self.base = base
        self.concept = concept
        self.token_id = None
        self.prepared: BasePreparation | None = None
        base.freeze()
        self.embedding = self.factors = None
        if concept is not None:
            concept.check_fits(base)  # made for this base, and its tensors fit it
            self.prepared = prepare_base(base, concept.token)  # in place; see the class docstring
            self.token_id = self.prepared.token_id
            # moved to the base's device once; fp32 (the processors cast to the activations' dtype)
            self.embedding = concept.embedding.to(base.device, torch.float32).unsqueeze(0)  # [1, D]
            self.factors = {k: (A.to(base.device, torch.float32), B.to(base.device, torch.float32))
                            for k, (A, B) in concept.batched_factors().items()}
        sampler = SCHEDULERS[scheduler].from_config(base.scheduler.config)
        if base.is_sdxl:
            self.pipe = StableDiffusionXLPipeline(
                vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=sampler,
                add_watermarker=False,
            )
        else:
            self.pipe = StableDiffusionPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                scheduler=sampler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        self.pipe.set_progress_bar_config(disable=True)

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.base.vae_scale_factor * 2 ** (len(self.base.unet.config.down_block_types) - 1)

    def check_size(self, height: int | None, width: int | None, num_images: int = 1) -> tuple[int, int]:
        """Validated (height, width); None means the base's resolution. Each side is at most
        ``MAX_SIDE_FACTOR`` times the base's resolution (a base draws its own size best; far larger
        sizes only exhaust memory), and the estimated memory of ``num_images`` at once must fit."""
        m = self.size_multiple()
        sides = tuple(self.base.resolution if side is None else int(side) for side in (height, width))
        if any(side < m or side % m for side in sides):
            raise DatencoderError(f"height and width must be positive multiples of {m} for this base model, "
                                  f"got {sides[0]}x{sides[1]}")
        limit = MAX_SIDE_FACTOR * self.base.resolution
        need = self.memory_estimate(*sides, num_images)
        if max(sides) > limit:
            raise DatencoderError(f"{sides[0]}x{sides[1]} pixels is above this base's limit of {limit} per side "
                                  f"({MAX_SIDE_FACTOR}x its resolution {self.base.resolution}); it would need about "
                                  f"{need / 2**30:.1f} GB")
        free = available_memory(self.base.device)
        if free is not None and need > free:
            raise DatencoderError(f"{num_images} image(s) of {sides[0]}x{sides[1]} at once need about "
                                  f"{need / 2**30:.1f} GB, {free / 2**30:.1f} GB is free; use fewer pixels or "
                                  "a smaller batch")
        return sides

    def memory_estimate(self, height: int, width: int, num_images: int = 1) -> int:
        """Bytes the activations of one sampling call take, roughly: the UNet's first level (the
        latent grid x its channels, for the guided pair, the tensors kept for the skip connections
        and a few in flight) or the VAE decoder's last (full resolution), whichever is larger."""
        f = self.base.vae_scale_factor
        size = torch.finfo(self.base.dtype).bits // 8
        unet, vae = self.base.unet.config, self.base.vae.config
        unet_bytes = (2 * num_images * (height // f) * (width // f) * unet.block_out_channels[0] * size
                      * (2 * unet.layers_per_block + 4))
        vae_bytes = num_images * height * width * vae.block_out_channels[0] * size * 4
        return int(max(unet_bytes, vae_bytes))

    def check(self, prompts: str | list[str], num_images_per_prompt: int = 1, num_inference_steps: int = 25,
              guidance_scale: float = 7.5, seed: int | None = None, height: int | None = None,
              width: int | None = None, lora_scale: float = 1.0, *,
              generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
              callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",)) -> None:
        """Every argument error of a call, in one line, before any compute."""
        count = num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise DatencoderError(f"num_images_per_prompt must be a whole number, got {count!r}")
        if count < 1 or num_inference_steps < 1:
            raise DatencoderError("num_images_per_prompt and num_inference_steps must be at least 1")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        total = count * len(prompts)
        self.check_size(height, width, total)
        if output_type not in OUTPUT_TYPES:
            raise DatencoderError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
        if isinstance(generator, list) and len(generator) != total:
            raise DatencoderError(f"{len(generator)} generators for {total} images ({len(prompts)} prompt(s) x "
                                  f"{count} per prompt); pass one generator, or one per image")
        known = self.pipe._callback_tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in known]
        if unknown:
            raise DatencoderError(f"callback_on_step_end_tensor_inputs {unknown} are not offered to the callback; "
                                  f"choose from {', '.join(known)}")
        if not math.isfinite(lora_scale):
            raise DatencoderError(f"lora_scale must be a finite number, got {lora_scale}")
        limit = self.pipe.scheduler.config.num_train_timesteps
        if num_inference_steps > limit:
            raise DatencoderError(f"{num_inference_steps} sampling steps exceed the scheduler's {limit} "
                                  f"training timesteps; use at most {limit}")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise DatencoderError(f"the guidance scale must be a finite number >= 0, got {guidance_scale}")
        if seed is not None:
            check_seed(seed)
        concept = self.concept
        if concept is not None:
            filled = [fill_placeholder(p, concept.placeholder, concept.token) for p in prompts]
            check_placeholder_kept(self.base.tokenizer, filled, self.token_id, concept.placeholder)

    @torch.no_grad()
    def _states(self, prompts: list[str]) -> tuple[TextStates, TextStates | None]:
        """Soft and hard prompt states (hard is None without a concept)."""
        concept = self.concept
        if concept is None:
            return encode_text(self.base, prompts), None
        soft = encode_text(self.base, [fill_placeholder(p, concept.placeholder, concept.token) for p in prompts],
                           concept.token, self.embedding)
        return soft, encode_text(self.base, hard_prompts(prompts, concept.placeholder, [concept.hard_word]))

    def _negative(self, negative_prompt: str, rows: int) -> TextStates:
        text = encode_text(self.base, [negative_prompt] * rows)
        if self.base.is_sdxl and not negative_prompt and self.pipe.config.force_zeros_for_empty_prompt:
            # what StableDiffusionXLPipeline does without a negative prompt: zeros, not the empty text
            return TextStates(torch.zeros_like(text.states), torch.zeros_like(text.pooled))
        return text

    def __call__(self, prompt: str | list[str], *, num_images_per_prompt: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = 0,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
                 dual_path: bool = True, lora_scale: float = 1.0,
                 num_images: int | None = None, callback=None) -> ConceptPipelineOutput | tuple:
        """Images of ``prompt`` (S* stands for the concept), called like a diffusers pipeline.

        Every argument but the prompt is a keyword. Those diffusers' pipelines take mean the same here:
        ``num_images_per_prompt`` (default 1; the images come prompt-major), ``num_inference_steps``,
        ``guidance_scale``, ``negative_prompt`` (one text for every prompt), ``generator`` (one
        ``torch.Generator``, or one per image), ``height``/``width`` (default: the base's
        resolution), ``output_type`` ("pil", "np", "pt" or "latent"), ``return_dict`` (True: a
        ``ConceptPipelineOutput``, whose ``.images`` are the images; False: the tuple ``(images,)``),
        and ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`` after each
        step, with ``callback_kwargs`` holding the tensors named in
        ``callback_on_step_end_tensor_inputs`` (default ``latents``; a tensor in the returned dict
        replaces the sampler's). ``pipe`` there is the diffusers pipeline that samples
        (``self.pipe``), so diffusers' own callbacks and ``pipe._interrupt = True`` work.

        Our own: ``seed`` seeds a fresh CPU generator when no ``generator`` is passed (the default 0
        makes calls reproducible; with a generator the seed is unused); ``dual_path=False`` samples the
        concept's single path (what an export gives); ``lora_scale`` multiplies the concept's offset
        scale (0: the embedding alone, no offsets).

        Deprecated, for one release (each warns with a ``FutureWarning``): ``num_images`` (now
        ``num_images_per_prompt``) and ``callback(step_index, num_inference_steps)`` (now
        ``callback_on_step_end``). The default count is diffusers' one image per prompt; the old
        ``num_images`` defaulted to 4.
        """
        if num_images is not None:
            if num_images_per_prompt is not None:
                raise DatencoderError("num_images is the deprecated name of num_images_per_prompt; "
                                      "pass num_images_per_prompt only")
            warnings.warn("ConceptPipeline: num_images= is deprecated and will be removed; "
                          "use num_images_per_prompt=", FutureWarning, stacklevel=2)
            num_images_per_prompt = num_images
        num_images_per_prompt = 1 if num_images_per_prompt is None else num_images_per_prompt
        if callback is not None:
            if callback_on_step_end is not None:
                raise DatencoderError("callback(step, total) is the deprecated form of callback_on_step_end; "
                                      "pass callback_on_step_end only")
            warnings.warn("ConceptPipeline: callback(step, total) is deprecated and will be removed; use "
                          "callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> callback_kwargs",
                          FutureWarning, stacklevel=2)
            steps, old = num_inference_steps, callback

            def callback_on_step_end(pipe, i, t, tensors):
                old(i, steps)
                return tensors
        negative_prompt = "" if negative_prompt is None else negative_prompt
        if not isinstance(negative_prompt, str):
            raise DatencoderError(f"negative_prompt must be one text (used for every prompt), got {negative_prompt!r}")
        self.check(prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
                   seed if generator is None else None, height, width, lora_scale, generator=generator,
                   output_type=output_type, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        height, width = self.check_size(height, width)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]  # prompt-major, as diffusers
        soft, hard = self._states(prompts)
        negative = self._negative(negative_prompt, len(prompts))
        kwargs = None
        pooled = soft.pooled
        concept = self.concept
        if concept is not None:
            use_dual = dual_path and uses_dual_path(concept.blend_self, concept.blend_cross)
            hard = hard if use_dual else None
            # as the objective: the time embedding's pooled text by dual_path.pooled (SDXL)
            pooled = pooled_text(soft.pooled, hard.pooled if hard is not None else None, concept.pooled,
                                 concept.blend_cross)
            hard_states = hard.states if hard is not None else None
            if hard_states is not None and guidance_scale > 1:
                hard_states = torch.cat([negative.states, hard_states])  # diffusers batches [uncond, cond]
            kwargs = {"adapter": AdapterInputs(
                factors=self.factors, hard_states=hard_states,
                blend_self=concept.blend_self, blend_cross=concept.blend_cross,
                scale=concept.scale * lora_scale)}
        added = {}
        if self.base.is_sdxl:
            added = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative.pooled}
        images = self.pipe(
            prompt_embeds=soft.states, negative_prompt_embeds=negative.states, **added,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, height=height,
            width=width, cross_attention_kwargs=kwargs, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
        ).images
        return ConceptPipelineOutput(images=images) if return_dict else (images,)
