"""Text conditioning of the UNet over one text encoder (SD 1.x/2.x) or two (SDXL).

SD 1.x/2.x: the states of one text encoder feed cross-attention. SDXL (Podell et al. 2023) runs
two encoders on the same prompt and concatenates their penultimate hidden states along the
width; the pooled projection of the second encoder plus six numbers (original size, crop
top-left, target size) form the ``text_time`` added embedding that joins the timestep embedding
in *every* UNet call — the objective, the denoiser features and the sampler alike.

The placeholder S* gets one word embedding per encoder. The method's embedding v is their
concatenation, [sum(token_dims)], so the encoder head, tuning and the regularisers see one
vector; this module splits it per encoder. Nearest real words are found in a joint cosine space
(``joint_unit``) over the vocabulary the two tokenizers share: one hard word for both encoders,
since both read the same prompt text (docs/architecture.md, "SDXL").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatencoderError
from .tokens import add_placeholder, inject_embeddings, nearest_tokens, vocabulary

__all__ = ["TextStates", "encode_text", "added_cond_kwargs", "pooled_text", "split_embedding", "add_placeholders",
           "text_vocabulary", "word_embedding", "joint_unit", "nearest_words"]


@dataclass
class TextStates:
    states: Tensor
    """[B, L, D] cross-attention context (SDXL: D = D1 + D2)."""
    pooled: Tensor | None = None
    """[B, P] pooled projection of the last text encoder (SDXL only)."""


def split_embedding(base, embedding: Tensor) -> list[Tensor]:
    """[..., sum(token_dims)] -> one [..., D_k] per text encoder."""
    dims = base.token_dims
    if embedding.shape[-1] != sum(dims):
        raise DatencoderError(f"the embedding has width {embedding.shape[-1]} but this base model's text "
                              f"encoders take {' + '.join(map(str, dims))}; use a concept made for this base")
    return list(embedding.split(list(dims), dim=-1))


def pipeline_ids(tokenizer, prompts: list[str]) -> Tensor:
    # as the diffusers pipelines tokenize: padded to the tokenizer's length, truncated
    return tokenizer(list(prompts), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def _injected(tokenizer, text_encoder, token: str | None, vectors: Tensor | None):
    if vectors is None:
        return contextlib.nullcontext()
    return inject_embeddings(text_encoder, tokenizer.convert_tokens_to_ids(token), vectors)


def encode_text(base, prompts: list[str] | str, token: str | None = None,
                embedding: Tensor | None = None) -> TextStates:
    """States of ``prompts`` as the diffusers pipeline of the family computes them.

    With ``embedding`` [N, sum(token_dims)], occurrences of ``token`` embed as row ``i % N`` of it
    for prompt i (the part of each encoder's width going to that encoder).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not base.is_sdxl:
        with _injected(base.tokenizer, base.text_encoder, token, embedding):
            return TextStates(base.encode_prompt(base.tokenize(prompts)))
    parts = split_embedding(base, embedding) if embedding is not None else [None] * len(base.text_encoders)
    states, pooled = [], None
    for (tokenizer, text_encoder), part in zip(base.text_encoders, parts):
        with _injected(tokenizer, text_encoder, token, part):
            out = text_encoder(pipeline_ids(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out[0]  # [B, P]: only the last (projection) encoder's is kept, as in diffusers
    return TextStates(torch.cat(states, dim=-1), pooled)


def added_cond_kwargs(base, text: TextStates) -> dict[str, Tensor] | None:
    """The UNet's ``added_cond_kwargs`` for these states: SDXL's pooled text and size/crop ids.

    Training and sampling both use the base resolution, uncropped: (H, W, 0, 0, H, W), what
    ``StableDiffusionXLPipeline`` passes by default at that size.
    """
    if not base.is_sdxl:
        return None
    res = base.resolution
    pooled = text.pooled
    time_ids = torch.tensor([res, res, 0, 0, res, res], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}  # [B, 6]


def pooled_text(soft: Tensor | None, hard: Tensor | None, mode: str, blend: float) -> Tensor | None:
    """SDXL's pooled vector [B, P] for the time embedding under the dual path (``dual_path.pooled``).

    The time embedding is shared by both attention paths and every resnet, so only 'hard' keeps
    the vanilla path the base model on the hard prompt. ``hard`` None (single path): the soft one.
    'blend' is written hard + a * (soft - hard), which is the hard vector exactly at a = 0.
    """
    if mode not in ("soft", "hard", "blend"):
        raise DatencoderError(f"dual_path.pooled must be 'soft', 'hard' or 'blend', got {mode!r}")
    if hard is None or soft is None or mode == "soft":
        return soft
    return hard if mode == "hard" else hard + blend * (soft - hard)


def add_placeholders(base, token: str) -> int:
    """Add ``token`` to every tokenizer/text encoder; the id in the first tokenizer."""
    ids = [add_placeholder(tokenizer, text_encoder, token) for tokenizer, text_encoder in base.text_encoders]
    return ids[0]


def text_vocabulary(base, whole_words_only: bool = True) -> tuple[Tensor, Tensor]:
    """Real-word ids and their embeddings in every encoder, concatenated: ([V], [V, sum(token_dims)]).

    SDXL's tokenizers share one vocabulary; the ids both hold (the second pads with a real
    character, which it counts as special) are kept, and must name the same token in both.
    """
    if not base.is_sdxl:
        return vocabulary(base.tokenizer, base.text_encoder, whole_words_only)
    found = [vocabulary(tokenizer, te, whole_words_only)[0] for tokenizer, te in base.text_encoders]
    common = sorted(set.intersection(*(set(ids.tolist()) for ids in found)))
    pieces = [tokenizer.convert_ids_to_tokens(common) for tokenizer, _ in base.text_encoders]
    if not common or any(p != pieces[0] for p in pieces[1:]):
        raise DatencoderError("the text encoders' tokenizers do not share a vocabulary; the hard prompt "
                              "needs one real word that every encoder reads")
    ids = torch.tensor(common, dtype=torch.long)
    tables = [te.get_input_embeddings().weight.detach()[ids].float() for _, te in base.text_encoders]
    return ids, torch.cat(tables, dim=-1)


def word_embedding(base, word: str) -> Tensor:
    """Mean input embedding of ``word``'s tokens in every encoder, concatenated: [sum(token_dims)]."""
    rows = []
    for tokenizer, text_encoder in base.text_encoders:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        rows.append(text_encoder.get_input_embeddings().weight[ids].mean(0).detach().float())
    return torch.cat(rows)


def joint_unit(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Per-encoder unit vectors, concatenated and scaled by 1/sqrt(K): [..., sum(dims)].

    The cosine of two such vectors is the mean over the K encoders of their per-encoder cosines,
    so nearest words and the contrastive regulariser weigh every encoder equally whatever its
    width. One encoder: ``x`` unchanged (a cosine ignores the scale).
    """
    if len(dims) == 1:
        return x
    parts = x.float().split(list(dims), dim=-1)
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1) / len(dims) ** 0.5


def nearest_words(embedding: Tensor, table: Tensor, dims: tuple[int, ...], k: int = 1) -> tuple[Tensor, Tensor]:
    """The k rows of the real-word ``table`` [V, D] nearest each embedding [N, D] by the joint
    cosine (``joint_unit``): ([N, k] row indices, [N, k] cosines); no gradient.

    The one definition of "nearest word": the hard prompt, the pre-training collapse watch and
    the health report all use it, so on SDXL they name the same word.
    """
    return nearest_tokens(joint_unit(embedding.detach(), dims), joint_unit(table.to(embedding.device), dims), k)
