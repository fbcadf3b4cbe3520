"""Generation with a concept: a thin layer over diffusers' StableDiffusionPipeline (SDXL:
StableDiffusionXLPipeline, with the pooled text of each prompt as ``pooled_prompt_embeds``).

The soft prompt (S* -> the concept's embedding) goes in as ``prompt_embeds``; the hard prompt
(S* -> the nearest real word) and the low-rank factors travel to the dual-path processors
through ``cross_attention_kwargs``, so the sampler is diffusers' own and sampling is the exact
dual-path model the concept was tuned with. Without a concept it is the plain base model.
"""

from __future__ import annotations

import math

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from PIL import Image

from .attention import AdapterInputs, uses_dual_path
from .base import BaseModel
from .concept import Concept
from .conditioning import TextStates, encode_text, pooled_text
from .config import check_seed
from .errors import DatencoderError
from .prepare import BasePreparation, prepare_base
from .tokens import check_placeholder_kept, fill_placeholder, hard_prompts

__all__ = ["ConceptPipeline"]

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
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


class ConceptPipeline:
    """Images from a concept (or from the plain base without one) with diffusers' sampler.

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

    def check(self, prompts: str | list[str], num_images: int = 1, num_inference_steps: int = 25,
              guidance_scale: float = 7.5, seed: int | None = None, height: int | None = None,
              width: int | None = None, lora_scale: float = 1.0) -> None:
        """Every argument error of a call, in one line, before any compute."""
        if num_images < 1 or num_inference_steps < 1:
            raise DatencoderError("num_images and num_inference_steps must be at least 1")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_size(height, width, num_images * len(prompts))
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

    def __call__(self, prompt: str | list[str], num_images: int = 4, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, negative_prompt: str = "", seed: int | None = 0,
                 generator: torch.Generator | None = None, dual_path: bool = True,
                 output_type: str = "pil", callback=None, height: int | None = None,
                 width: int | None = None, lora_scale: float = 1.0) -> list[Image.Image] | torch.Tensor:
        """``lora_scale`` multiplies the concept's offset scale (0: the embedding alone, no offsets);
        ``height``/``width`` default to the base's resolution."""
        self.check(prompt, num_images, num_inference_steps, guidance_scale, seed if generator is None else None,
                   height, width, lora_scale)
        height, width = self.check_size(height, width)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]  # num_images per prompt, in order
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
        step_cb = None
        if callback is not None:
            def step_cb(pipe, i, t, tensors):
                callback(i, num_inference_steps)
                return tensors
        added = {}
        if self.base.is_sdxl:
            added = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative.pooled}
        out = self.pipe(
            prompt_embeds=soft.states, negative_prompt_embeds=negative.states, **added,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, height=height,
            width=width, cross_attention_kwargs=kwargs, output_type=output_type,
            callback_on_step_end=step_cb,
        )
        return out.images
