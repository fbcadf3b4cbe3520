"""The encoder's own health: do its predicted embeddings stay diverse and semantic?

An encoder can collapse: every image gets (nearly) the same word embedding, so its nearest real
word is the same for all inputs and the hard path of the dual path always says that word. These
numbers make a collapse visible, and test the paper's claim that the contrastive regulariser makes
the learned tokens "more semantic" (METHOD.md):

- distinct nearest words, and the share of the most common one (a healthy encoder: no single word
  for more than a small share of the inputs);
- the mean pairwise cosine of the embeddings (near 1: all alike), and their mean cosine to their
  nearest word (near 1: the embeddings sit on real words; low: off the vocabulary's manifold);
- with the words that name each input's concept or category: how often one of the k nearest
  words is one of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import joint_unit, nearest_words

__all__ = ["embedding_health", "hubness", "label_purity", "nearest_word_stats"]


def nearest_word_stats(nearest: Sequence[int]) -> dict[str, float]:
    """Cheap collapse signal of nearest-word indices: {distinct_nearest, top_word_share}."""
    counts = Counter(int(i) for i in nearest)
    if not counts:
        return {"distinct_nearest": 0, "top_word_share": 0.0}
    return {"distinct_nearest": len(counts), "top_word_share": counts.most_common(1)[0][1] / len(nearest)}


def _mean_pairwise_cosine(embeddings: Tensor) -> float:
    n = embeddings.shape[0]
    if n < 2:
        return 1.0
    unit = F.normalize(embeddings.float(), dim=-1)
    cos = unit @ unit.T  # [N, N]
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def embedding_health(embeddings: Tensor, table: Tensor, word_of: Callable[[int], str],
                     concept_words: Sequence[set[str]] | None = None, k: int = 5,
                     most_common: int = 10, dims: tuple[int, ...] | None = None) -> dict:
    """Health numbers of predicted embeddings [N, D] against the real-word table [V, D].

    ``dims``: the base's ``token_dims``; with two text encoders (SDXL) every cosine is the joint
    one (``conditioning.joint_unit``), so the nearest word is the hard prompt's word.

    ``word_of(j)`` is the word of table row j; ``concept_words[i]`` the (lowercase) words naming
    input i's concept or category. Returns distinct_nearest, top_word, top_word_share,
    mean_pairwise_cosine, nearest_cosine (mean cosine to the nearest word), most_common ([[word, count], ...]) and, with ``concept_words``,
    semantic_top{k}: the share of inputs with one of those words among their k nearest words.
    """
    if concept_words is not None and len(concept_words) != embeddings.shape[0]:
        raise ValueError(f"{len(concept_words)} word sets for {embeddings.shape[0]} embeddings")
    dims = tuple(dims) if dims else (embeddings.shape[-1],)
    index, cos = nearest_words(embeddings, table, dims, min(k, table.shape[0]))  # [N, k]
    first = index[:, 0].tolist()
    counts = Counter(first)
    words = {j: word_of(j) for j in set(index.flatten().tolist())}
    result = {"inputs": len(first), **nearest_word_stats(first),
              "top_word": words[counts.most_common(1)[0][0]],
              "mean_pairwise_cosine": round(_mean_pairwise_cosine(joint_unit(embeddings, dims)), 5),
              "nearest_cosine": round(float(cos[:, 0].mean()), 5),
              "most_common": [[words[j], c] for j, c in counts.most_common(most_common)]}
    if concept_words is not None:
        hits = [any(words[j].lower() in concept_words[i] for j in row) for i, row in enumerate(index.tolist())]
        result[f"semantic_top{k}"] = sum(hits) / len(hits)
    return result


@torch.no_grad()
def hubness(table: Tensor, k: int = 10, chunk: int = 2048) -> Tensor:
    """[V] hub score of each word: its mean cosine to its k nearest other words.

    Hub words (high scores) lie near many others, so they are the nearest word of many directions;
    ranking a collapsed encoder's word by this score tells a hub from a word the encoder chose.
    """
    unit = F.normalize(table.float(), dim=-1)
    scores = []
    for start in range(0, unit.shape[0], chunk):
        cos = unit[start:start + chunk] @ unit.T  # [c, V]
        rows = torch.arange(cos.shape[0])
        cos[rows, rows + start] = -2.0  # not itself
        scores.append(cos.topk(min(k, unit.shape[0] - 1), dim=-1).values.mean(-1))
    return torch.cat(scores)


def label_purity(labels: Sequence[str], words: Sequence[str]) -> float:
    """How much a label (e.g. the image's background colour) decides the nearest word: the share of
    inputs whose word is the most common word among the inputs with their label (1.0: the word is a
    function of the label; about 1 / distinct words when it is unrelated)."""
    if len(labels) != len(words):
        raise ValueError(f"{len(labels)} labels for {len(words)} words")
    if not words:
        return 0.0
    groups: dict[str, Counter] = {}
    for label, word in zip(labels, words):
        groups.setdefault(label, Counter())[word] += 1
    return sum(c.most_common(1)[0][1] for c in groups.values()) / len(words)
