"""Dual-path attention processor with per-sample low-rank offsets (METHOD.md, "Dual path").

Every attention layer computes

    out = a * Attn_{W + dW}(h, soft context) + (1 - a) * Attn_W(h, hard context)

where the soft context holds the predicted embedding of S*, the hard context the prompt with
S* replaced by the embedding's nearest real word, and ``dW`` the per-sample offsets
(``lora.py``). For self-attention both paths see the same input ``h``; only the weights
differ. ``a = 1`` is the plain single-path LoRA.

Following diffusers, behaviour is switched by installing processors with
``unet.set_attn_processor`` and per-call data travels through ``cross_attention_kwargs``
(``{"adapter": AdapterInputs(...)}``); calls without it are the vanilla model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from .errors import DatencoderError
from .lora import lora_linear

__all__ = [
    "AdapterInputs",
    "DualPathProcessor",
    "install_processors",
    "remove_processors",
    "attention_layers",
    "target_layer_shapes",
    "uses_dual_path",
]

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class AdapterInputs:
    """Per-call inputs of the processors; factor batch N must divide the UNet batch."""

    factors: dict[str, tuple[Tensor, Tensor]] | None = None
    """``"<attention module>.<target>" -> (A [N, r, in], B [N, out, r])``."""
    hard_states: Tensor | None = None
    """Encoder states of the hard prompt, one row per UNet row like the soft ones; None = single path."""
    blend_self: float = 1.0
    blend_cross: float = 1.0
    scale: float = 1.0


def uses_dual_path(blend_self: float, blend_cross: float) -> bool:
    """Whether the vanilla path runs at all: a = 1 in every layer is the single path."""
    return blend_self < 1 or blend_cross < 1


def attention_layers(unet) -> dict[str, bool]:
    """Attention module names of the UNet -> whether they are cross-attention layers."""
    layers = {}
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        module = unet.get_submodule(name)
        layers[name] = bool(module.is_cross_attention)
    return layers


def _linear(module: Attention, target: str):
    return module.to_out[0] if target == "to_out.0" else getattr(module, target)


def target_layer_shapes(unet, targets=TARGETS, attention_kinds=("self", "cross")) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection that receives offsets, read from the UNet itself.

    ``targets``: projections of each attention module (of ``TARGETS``); ``attention_kinds``: "self"
    and/or "cross" (the ``EncoderConfig`` fields of those names).
    """
    shapes = {}
    for name, is_cross in attention_layers(unet).items():
        if ("cross" if is_cross else "self") not in attention_kinds:
            continue
        module = unet.get_submodule(name)
        for target in targets:
            if target not in TARGETS:
                raise DatencoderError(f"offset target {target!r} is not one of {', '.join(TARGETS)}")
            linear = _linear(module, target)
            shapes[f"{name}.{target}"] = (linear.in_features, linear.out_features)
    return shapes


class DualPathProcessor:
    """Attention with per-sample offsets and the dual-path blend; vanilla without inputs."""

    def __init__(self, name: str, is_cross: bool):
        self.name = name
        self.is_cross = is_cross

    def _project(self, attn: Attention, target: str, x: Tensor, inputs: AdapterInputs | None) -> Tensor:
        linear = _linear(attn, target)
        factors = inputs.factors if inputs is not None else None
        pair = factors.get(f"{self.name}.{target}") if factors else None
        if pair is None:
            return linear(x)
        return lora_linear(linear, x, pair[0], pair[1], inputs.scale)

    def _attend(self, attn: Attention, h: Tensor, context: Tensor | None, mask: Tensor | None,
                inputs: AdapterInputs | None) -> Tensor:
        # h: [B, S, C] after the shared pre-processing in __call__
        batch = h.shape[0]
        query = self._project(attn, "to_q", h, inputs)
        if context is None:
            context = h
        elif context.shape[0] != batch:
            # never let view() below silently fold one prompt's tokens into several rows
            raise DatencoderError(f"attention layer {self.name}: the text context has {context.shape[0]} rows "
                                  f"but the hidden states have {batch}; pass one context row per UNet row")
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = self._project(attn, "to_k", context, inputs)
        value = self._project(attn, "to_v", context, inputs)
        head_dim = key.shape[-1] // attn.heads
        # [B, S, heads * d] -> [B, heads, S, d]
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = self._project(attn, "to_out.0", out, inputs)
        return attn.to_out[1](out)

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 adapter: AdapterInputs | None = None) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)  # [B, HW, C]
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        out = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, adapter)
        a = 1.0
        if adapter is not None and adapter.hard_states is not None:
            a = adapter.blend_cross if self.is_cross else adapter.blend_self
        if a != 1.0:
            hard_context = adapter.hard_states if self.is_cross else None
            vanilla = self._attend(attn, hidden_states, hard_context, attention_mask, None)
            # hard + a * (soft - hard): exactly the vanilla output when both paths agree
            out = vanilla + a * (out - vanilla)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_processors(unet) -> dict:
    """Install a ``DualPathProcessor`` on every attention layer; return the previous processors."""
    previous = dict(unet.attn_processors)
    layers = attention_layers(unet)
    unet.set_attn_processor({f"{name}.processor": DualPathProcessor(name, cross) for name, cross in layers.items()})
    return previous


def remove_processors(unet, previous: dict) -> None:
    """Restore the processors returned by ``install_processors``."""
    unet.set_attn_processor(previous)
