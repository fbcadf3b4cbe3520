"""Encoder health numbers on hand-made embeddings and a tiny real system."""

from __future__ import annotations

import torch

from datencoder.health import embedding_health, nearest_word_stats

WORDS = ["dog", "cat", "apple", "car", "face", "smile"]


def _table():
    return torch.eye(len(WORDS), 8) + 0.01  # [V, D]: row j points along axis j


def test_a_collapsed_encoder_has_one_word_and_cosine_one():
    emb = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]).repeat(5, 1)
    health = embedding_health(emb, _table(), WORDS.__getitem__)
    assert health["distinct_nearest"] == 1 and health["top_word"] == "car" and health["top_word_share"] == 1.0
    assert abs(health["mean_pairwise_cosine"] - 1) < 1e-5 and health["most_common"] == [["car", 5]]


def test_diverse_semantic_embeddings_score_as_such():
    emb = torch.eye(4, 8) * 3 + 0.1 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    words = [{"dog", "animal"}, {"kitten", "face"}, {"apple", "fruit"}, {"car"}]
    health = embedding_health(emb, _table(), WORDS.__getitem__, words, k=1)
    assert health["distinct_nearest"] == 4 and health["top_word_share"] == 0.25
    assert health["semantic_top1"] == 0.75  # the kitten's nearest word "cat" is not among its words
    assert health["mean_pairwise_cosine"] < 0.2
    # among all 6 words, "face" is one of the kitten's
    assert embedding_health(emb, _table(), WORDS.__getitem__, words, k=6)["semantic_top6"] == 1.0


def test_nearest_word_stats_of_a_window():
    assert nearest_word_stats([3, 3, 3, 1]) == {"distinct_nearest": 2, "top_word_share": 0.75}
    assert nearest_word_stats([]) == {"distinct_nearest": 0, "top_word_share": 0.0}
