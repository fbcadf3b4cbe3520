"""Placeholder-token utilities: add S*, inject per-sample embeddings, find nearest real words.

Embeddings are injected with a forward hook on the text encoder's input-embedding layer, so
any transformers text model works (CLIP, BERT, ...) and one batch can carry a different
embedding of S* per sample. The vocabulary of "real words" (METHOD.md, contrastive
regulariser) is the tokenizer's own, optionally filtered to whole, alphabetic words.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import DatencoderError
from .lora import tile_to_batch

__all__ = [
    "add_placeholder",
    "inject_embeddings",
    "vocabulary",
    "nearest_tokens",
    "token_word",
    "fill_placeholder",
    "hard_prompts",
    "check_placeholder_kept",
]


def add_placeholder(tokenizer, text_encoder, token: str) -> int:
    """Add ``token`` to the tokenizer (once) and grow the embedding table; return its id."""
    from transformers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken(token, normalized=False, special=False))
    token_id = tokenizer.convert_tokens_to_ids(token)
    table = text_encoder.get_input_embeddings()
    if token_id >= table.num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = text_encoder.get_input_embeddings().weight
            weight[token_id] = weight[: table.num_embeddings].mean(dim=0)
    ids = tokenizer(f"a {token}", add_special_tokens=False)["input_ids"]
    if token_id not in ids:
        raise DatencoderError(f"the tokenizer splits the placeholder token {token!r}; choose another model.token")
    return token_id


@contextlib.contextmanager
def inject_embeddings(text_encoder, token_id: int, vectors: Tensor) -> Iterator[None]:
    """Within the block, occurrences of ``token_id`` embed as ``vectors[i % N]`` for row i."""
    layer = text_encoder.get_input_embeddings()

    def hook(module, args, output):
        ids = args[0] if args else None
        if ids is None:
            return output
        v = tile_to_batch(vectors, ids.shape[0]).to(output.dtype)  # [B, D]
        mask = (ids == token_id).unsqueeze(-1)  # [B, L, 1]
        return torch.where(mask, v.unsqueeze(1), output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _is_whole_word(piece: str, style: str) -> str | None:
    if style == "bpe":
        word = piece[:-4] if piece.endswith("</w>") else None
    elif style == "wordpiece":
        word = None if piece.startswith("##") else piece
    elif style == "sentencepiece":
        word = piece[1:] if piece.startswith("\u2581") else None
    elif style == "bytelevel":
        word = piece[1:] if piece.startswith("\u0120") else None
    else:
        word = piece
    return word if word and len(word) >= 2 and word.isascii() and word.isalpha() else None


def _vocab_style(pieces: list[str]) -> str:
    if any(p.endswith("</w>") for p in pieces):
        return "bpe"
    if any(p.startswith("##") for p in pieces):
        return "wordpiece"
    if any(p.startswith("\u2581") for p in pieces):
        return "sentencepiece"
    if any(p.startswith("\u0120") for p in pieces):
        return "bytelevel"
    return "plain"


def vocabulary(tokenizer, text_encoder, whole_words_only: bool = True) -> tuple[Tensor, Tensor]:
    """Ids and embedding rows of the real vocabulary: ([V], [V, D]); added/special tokens excluded."""
    excluded = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    vocab = {piece: i for piece, i in tokenizer.get_vocab().items() if i not in excluded}
    style = _vocab_style(list(vocab))
    if whole_words_only:
        vocab = {p: i for p, i in vocab.items() if _is_whole_word(p, style)}
    if not vocab:
        raise DatencoderError("the tokenizer has no whole-word tokens; set loss.whole_words_only=false")
    weight = text_encoder.get_input_embeddings().weight
    ids = torch.tensor(sorted(i for i in vocab.values() if i < weight.shape[0]), dtype=torch.long)
    return ids, weight.detach()[ids].float()


def nearest_tokens(vectors: Tensor, table: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Top-k rows of ``table`` by cosine similarity to each vector: ([N, k] indices, [N, k] cos)."""
    cos = torch.nn.functional.normalize(vectors.float(), dim=-1) @ torch.nn.functional.normalize(table.float(), dim=-1).T
    values, index = cos.topk(k, dim=-1)
    return index, values


def token_word(tokenizer, token_id: int) -> str:
    """The text of a vocabulary token, as it would be written in a prompt."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


def fill_placeholder(prompt: str, placeholder: str, replacement: str) -> str:
    """Replace the placeholder; a prompt without it is an error that says how to write one."""
    if placeholder not in prompt:
        raise DatencoderError(
            f"prompt {prompt!r} does not contain the placeholder {placeholder!r}; "
            f"write it where the concept goes, e.g. 'a photo of {placeholder} on the beach'"
        )
    return prompt.replace(placeholder, replacement)


def hard_prompts(prompts: list[str], placeholder: str, words: list[str]) -> list[str]:
    """The hard prompts of the dual path: prompt i with the placeholder replaced by ``words[i % N]``.

    The row rule of the soft path and the offsets (``lora.tile_to_batch``): during tuning one
    word (N = 1) serves a batch of B prompts, during pre-training N = B.
    """
    if not words or len(prompts) % len(words):
        raise DatencoderError(f"{len(prompts)} prompts cannot share {len(words)} hard words "
                              "(the prompt batch must be a multiple of the embedding batch)")
    return [fill_placeholder(p, placeholder, words[i % len(words)]) for i, p in enumerate(prompts)]


def check_placeholder_kept(tokenizer, prompts: list[str], token_id: int, placeholder: str = "S*") -> None:
    """Refuse a prompt (placeholder already replaced by the token) whose token falls past the
    tokenizer's length: truncation would drop it silently and the concept would vanish."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        full = tokenizer(prompt, truncation=False)["input_ids"]
        kept = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
        if full.count(token_id) != kept.count(token_id):
            raise DatencoderError(
                f"the prompt is {len(full)} tokens long but the tokenizer keeps {limit} (special tokens "
                f"included), which would cut the placeholder {placeholder}; shorten the prompt or put "
                f"{placeholder} earlier"
            )
