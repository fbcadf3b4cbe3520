"""Encoder health numbers on hand-made embeddings and a tiny real system."""

from __future__ import annotations

import torch

from datencoder.health import embedding_health, hubness, label_purity, nearest_word_stats

WORDS = ["dog", "cat", "apple", "car", "face", "smile"]


def _table():
    return torch.eye(len(WORDS), 8) + 0.01  # [V, D]: row j points along axis j


def test_a_collapsed_encoder_has_one_word_and_cosine_one():
    emb = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]).repeat(5, 1)
    health = embedding_health(emb, _table(), WORDS.__getitem__)
    assert health["distinct_nearest"] == 1 and health["top_word"] == "car" and health["top_word_share"] == 1.0
    assert abs(health["mean_pairwise_cosine"] - 1) < 1e-5 and health["most_common"] == [["car", 5]]
    assert health["nearest_cosine"] > 0.99  # on the word itself


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


def test_hubness_ranks_the_word_near_many_others_first():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 16, generator=g)
    centre = torch.randn(16, generator=g)
    table[:30] = centre + 0.3 * torch.randn(30, 16, generator=g)  # a cluster of 30 words ...
    table[7] = centre  # ... and one word at its centre: nearer to all of them than they are to each other
    scores = hubness(table, k=5, chunk=64)  # chunks that divide nothing
    assert scores.shape == (300,) and int(scores.argmax()) == 7
    torch.testing.assert_close(scores, hubness(table, k=5, chunk=1000))
    direct = torch.nn.functional.normalize(table, dim=-1)
    cos = direct @ direct.T
    cos.fill_diagonal_(-2)
    torch.testing.assert_close(scores, cos.topk(5, dim=-1).values.mean(-1))


def test_label_purity_tells_a_word_that_follows_the_label():
    labels = ["red", "red", "blue", "blue", "blue", "green"]
    assert label_purity(labels, ["x", "x", "y", "y", "y", "z"]) == 1.0  # word = function of the label
    assert label_purity(labels, ["a", "b", "c", "d", "e", "f"]) == 0.5  # one of each group's words
    assert label_purity([], []) == 0.0
