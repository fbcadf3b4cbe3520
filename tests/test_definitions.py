"""One definition each: the nearest word, the tuned settings a concept records, the distinct
positives' vocabulary, the hypernetwork basis seed.

On SDXL the embedding is two encoders' vectors concatenated; "nearest word" is by the joint cosine
(``conditioning.joint_unit``), and the hard prompt, the pre-training collapse watch and the health
report must all name that word. The tests use random embeddings of the tiny SDXL, where the plain
cosine over the concatenation picks another word for about a third of them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder.config import Config, from_dict, load_config, to_dict
from datencoder.conditioning import nearest_words
from datencoder.encoder import EncoderOutput
from datencoder.errors import DatencoderError
from datencoder.health import embedding_health
from datencoder.regularizers import distinct_nearest, nn_contrastive_loss
from datencoder.system import EncoderSystem
from datencoder.tokens import hard_prompts, nearest_tokens

from test_core import make_system


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_base_dir):
    return make_system(tiny_sdxl_base_dir)


def _disagreeing(system, n=40, seed=0):
    """Random embeddings [n, D] and their plain-cosine nearest rows; some differ from the joint ones."""
    embeddings = torch.randn(n, system.vocab_table.shape[1], generator=torch.Generator().manual_seed(seed))
    plain = nearest_tokens(embeddings, system.vocab_table, 1)[0][:, 0]
    joint = nearest_words(embeddings, system.vocab_table, system.base.token_dims)[0][:, 0]
    assert (plain != joint).sum() >= n // 10  # the two definitions do disagree here
    return embeddings, joint


def test_hard_word_and_health_report_name_the_joint_nearest_word(sdxl):
    embeddings, joint = _disagreeing(sdxl)
    objective = sdxl.objective
    hard = objective.hard_words(embeddings)
    assert hard == [objective.word(i) for i in joint.tolist()]
    health = embedding_health(embeddings, sdxl.vocab_table, objective.word, k=3,
                              most_common=len(embeddings), dims=sdxl.base.token_dims)
    assert dict(health["most_common"]) == Counter(hard) and health["distinct_nearest"] == len(set(hard))


def test_collapse_watch_counts_the_hard_words(tiny_sdxl_base_dir, tmp_path, monkeypatch):
    """Pre-training's health columns come from the hard words of the step's predictions."""
    import datencoder.pretraining as pretraining

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    seen, counted = [], []
    real_step, real_stats = EncoderSystem.training_step, pretraining.nearest_word_stats

    def step(self, pixels, prompts, generator=None, target=None):  # the watch gets embeddings where the definitions differ
        terms, out = real_step(self, pixels, prompts, generator, target)
        candidates, joint = _disagreeing(self)
        plain = nearest_tokens(candidates, self.vocab_table, 1)[0][:, 0]
        embeddings = candidates[(plain == joint).long().argsort(stable=True)[:len(prompts)]]  # differing rows first
        seen.append((self, embeddings))
        return terms, EncoderOutput(embeddings, out.factors)

    def stats(nearest):
        counted.append(list(nearest))
        return real_stats(nearest)

    monkeypatch.setattr(EncoderSystem, "training_step", step)
    monkeypatch.setattr(pretraining, "nearest_word_stats", stats)
    cfg = load_config("tiny", [f"model.pretrained={tiny_sdxl_base_dir}", f"data.root={tmp_path}",
                               f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "train.batch_size=4"])
    pretraining.pretrain(cfg)
    system, embeddings = seen[0]
    assert counted[0] == system.objective.nearest(embeddings)[0][:, 0].tolist()
    assert counted[0] != nearest_tokens(embeddings, system.vocab_table, 1)[0][:, 0].tolist()


def test_hard_prompts_take_word_i_mod_n():
    assert hard_prompts(["S* a", "b S*", "S* c"], "S*", ["dog"]) == ["dog a", "b dog", "dog c"]
    assert hard_prompts(["S*", "S* x"], "S*", ["dog", "cat"]) == ["dog", "cat x"]
    with pytest.raises(DatencoderError, match="multiple of the embedding batch"):
        hard_prompts(["S*", "S*", "S*"], "S*", ["dog", "cat"])


def test_distinct_positives_refuse_a_vocabulary_smaller_than_k_per_concept():
    table = torch.eye(3)  # 3 words
    v = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1]])  # two concepts
    assert distinct_nearest(v, table, 1).tolist() == [[0], [1]]
    assert distinct_nearest(torch.cat([v[:1], v[:1], v[1:]]), table, 1).tolist() == [[0], [0], [1]]  # copies share
    with pytest.raises(DatencoderError, match="needs 2 word\\(s\\) for each of the batch's 2 concepts but the "
                                              "vocabulary has 3"):
        distinct_nearest(v, table, 2)
    with pytest.raises(DatencoderError, match="loss.top_k_positives"):
        nn_contrastive_loss(v, table, top_k=2, num_negatives=0, distinct_positives=True)


def test_hypernetwork_basis_comes_from_the_runs_seed(tiny_base_dir):
    def basis(seed):
        system = make_system(tiny_base_dir, train={"seed": seed})
        return [a.detach().clone() for a in system.encoder.hypernetwork.A]

    zero, one = basis(0), basis(1)
    assert all(torch.equal(a, b) for a, b in zip(zero, basis(0)))
    assert not any(torch.equal(a, b) for a, b in zip(zero, one))


def test_concept_records_the_tune_settings_it_was_tuned_with(tiny_base_dir):
    from datencoder.config import TuneConfig
    from datencoder.tuning import personalize

    system = make_system(tiny_base_dir)
    tune = TuneConfig(steps=1, batch_size=1, lr_embedding=1e-2, seed=5)
    pixels = torch.zeros(3, system.base.resolution, system.base.resolution)
    concept = personalize(system, pixels, tune)
    assert concept.config["tune"] == to_dict(tune) != to_dict(system.cfg.tune)
    assert from_dict(Config, concept.config).tune == tune
