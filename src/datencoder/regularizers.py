"""Regularisers of the predicted embedding and offsets.

``nn_contrastive_loss`` is the paper's nearest-neighbour contrastive term (METHOD.md): each
predicted embedding v_i is pulled toward its nearest real word T[n_i] and pushed away from the
nearest words of the other concepts in the batch and from K random words (InfoNCE):

    L_i = -log( sum_{p in P_i} exp(cos(v_i, T_p)/tau) / sum_{c in C} exp(cos(v_i, T_c)/tau) )

with P_i the top-k nearest words of v_i (k=1: just n_i; no gradient through the argmax) and C
the union of every P_j in the batch and the K random words.

With ``predicted_negatives`` the other rows' predicted embeddings v_j join the denominator too
(exp(cos(v_i, v_j)/tau), gradient through both; rows equal to v_i, i.e. the same concept, are
left out). Without it nothing keeps two concepts from sharing a nearest word: a word shared by
several concepts is one candidate, so all of them snapping to one "hub" word costs nothing, and
the shipped minisd encoder did exactly that (reports/encoder_health.md).

With ``distinct_positives`` different concepts in a batch never share a positive word: rows take
their words greedily, the row closest to its word first, each the nearest word no other concept
has taken (copies of one concept share theirs). A batch of concepts that all start near one word
is then pulled toward as many different words, instead of onto the one word together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatencoderError
from .tokens import nearest_tokens

__all__ = ["distinct_nearest", "nn_contrastive_loss", "norm_loss", "l2_loss", "offset_l2"]


def _copies(v: Tensor) -> Tensor:
    """[N, N] bool: row i equals row j (itself, or another copy of the same concept)."""
    return (v.unsqueeze(1) == v.unsqueeze(0)).all(-1)


@torch.no_grad()
def distinct_nearest(v: Tensor, table: Tensor, k: int = 1) -> Tensor:
    """[N, k] indices of words near each row of v, no word shared by two different rows.

    Greedy: rows in order of their best cosine, each takes its k nearest words not yet taken;
    rows equal to each other (copies of one concept) get the same words.
    """
    n = v.shape[0]
    first = _copies(v).float().argmax(1)  # each row's first copy: the one that picks its words
    concepts = int((first == torch.arange(n, device=first.device)).sum())
    if k * concepts > table.shape[0]:
        raise DatencoderError(f"loss.distinct_positives needs {k} word(s) for each of the batch's {concepts} "
                              f"concepts but the vocabulary has {table.shape[0]}; lower loss.top_k_positives or "
                              "the batch size, or set loss.whole_words_only=false")
    reach = min(table.shape[0], k * n)  # enough candidates for every row to find k free words
    ranked, cos = nearest_tokens(v, table, reach)  # [N, reach]
    ranked_rows = ranked.tolist()
    result = torch.empty(n, k, dtype=torch.long)
    taken: set[int] = set()
    for i in cos[:, 0].argsort(descending=True).tolist():
        if first[i] == i:
            free = [j for j in ranked_rows[i] if j not in taken][:k]
            taken.update(free)
            result[i] = torch.tensor(free, dtype=torch.long)
    return result[first.cpu()].to(ranked.device)


def nn_contrastive_loss(v: Tensor, table: Tensor, tau: float = 0.07, num_negatives: int = 256,
                        top_k: int = 1, generator: torch.Generator | None = None,
                        predicted_negatives: bool = False, distinct_positives: bool = False) -> Tensor:
    """v: [N, D] predicted embeddings; table: [V, D] real-word embeddings -> scalar loss."""
    with torch.no_grad():
        if distinct_positives:
            positives = distinct_nearest(v, table, top_k)  # [N, k]
        else:
            positives, _ = nearest_tokens(v, table, top_k)  # [N, k]
        candidates = positives.flatten()
        if num_negatives > 0:
            extra = torch.randint(0, table.shape[0], (num_negatives,), generator=generator)
            candidates = torch.cat([candidates, extra.to(candidates.device)])
        candidates = torch.unique(candidates)  # [C]: a word shared by two concepts counts once
        is_positive = (candidates.unsqueeze(0).unsqueeze(-1) == positives.unsqueeze(1)).any(-1)  # [N, C]
    cand = F.normalize(table[candidates].to(v.dtype), dim=-1)  # [C, D]
    unit = F.normalize(v, dim=-1)
    logits = unit @ cand.T / tau  # [N, C]
    pos = logits.masked_fill(~is_positive, float("-inf")).logsumexp(-1)
    if predicted_negatives and v.shape[0] > 1:
        with torch.no_grad():
            same = _copies(v)  # [N, N]: itself, or a copy of the same concept
        others = (unit @ unit.T / tau).masked_fill(same, float("-inf"))  # [N, N]
        logits = torch.cat([logits, others], dim=-1)
    return (logits.logsumexp(-1) - pos).mean()


def norm_loss(v: Tensor, target_norm: float) -> Tensor:
    """Keep |v| near the mean norm of real word embeddings (relative squared error)."""
    return ((v.norm(dim=-1) - target_norm) / target_norm).pow(2).mean()


def l2_loss(v: Tensor, anchor: Tensor) -> Tensor:
    """E4T-style L2 pull toward an anchor embedding (the single-domain baseline)."""
    return (v - anchor.to(v)).pow(2).sum(-1).mean()


def offset_l2(factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Mean squared norm of the B factors (the part the encoder predicts)."""
    terms = [B.pow(2).mean() for _, B in factors.values()]
    return torch.stack(terms).mean() if terms else torch.zeros(())
