"""Invariants of the method core on a tiny real SD-family model (STYLE.md, point 9)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from datencoder.attention import AdapterInputs, DualPathProcessor, install_processors, remove_processors
from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.config import Config, from_dict
from datencoder.lora import delta_weight, lora_linear
from datencoder.objective import diffusion_target
from datencoder.regularizers import nn_contrastive_loss, norm_loss
from datencoder.tokens import nearest_tokens
from datencoder.system import EncoderSystem
from datencoder.tuning import personalize


def make_system(base_dir, **sections) -> EncoderSystem:
    data = {"model": {"pretrained": str(base_dir)}, "encoder": {"tower_layers": [-1, -2], "hidden_dim": 64},
            "tune": {"batch_size": 2}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    cfg = from_dict(Config, data)
    return EncoderSystem(load_base(str(base_dir)), cfg)


def unet_inputs(base, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = base.unet.config.sample_size
    latents = torch.randn(batch, base.unet.config.in_channels, size, size, generator=g)
    states = base.encode_prompt(base.tokenize(["a photo of a red apple"] * batch))
    return latents, torch.tensor([10, 500][:batch] * (batch // 2 or 1))[:batch], states


def random_factors(system, n, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    out = system.encoder.hypernetwork(torch.zeros(n, system.cfg.encoder.hidden_dim))
    return {k: (A + std * torch.randn(A.shape, generator=g), std * torch.randn(B.shape, generator=g))
            for k, (A, B) in out.items()}


@pytest.fixture(scope="module")
def system(tiny_base_dir):
    return make_system(tiny_base_dir)


def test_lora_linear_matches_dense_offset():
    lin = torch.nn.Linear(6, 5)
    A, B = torch.randn(3, 2, 6), torch.randn(3, 5, 2)
    x = torch.randn(6, 4, 6)  # 2x the factor batch, as under classifier-free guidance
    got = lora_linear(lin, x, A, B, scale=0.7)
    for i in range(6):
        w = lin.weight + delta_weight(A[i % 3], B[i % 3], 0.7)
        torch.testing.assert_close(got[i], x[i] @ w.T + lin.bias, rtol=1e-5, atol=1e-5)


def test_untrained_encoder_leaves_unet_bit_identical(tiny_base_dir, system):
    vanilla = load_base(str(tiny_base_dir)).freeze()
    latents, t, states = unet_inputs(vanilla)
    with torch.no_grad():
        expected = vanilla.unet(latents, t, states).sample
        pixels = torch.rand(2, 3, system.base.resolution, system.base.resolution) * 2 - 1
        out = system.predict(pixels, torch.Generator().manual_seed(0))
        assert all(torch.count_nonzero(B) == 0 for _, B in out.factors.values())
        for hard in (None, states):  # single path, and dual path with an identical hard prompt
            got = system.base.unet(latents, t, states, cross_attention_kwargs={"adapter": AdapterInputs(
                factors=out.factors, hard_states=hard, blend_self=0.3, blend_cross=0.6)}).sample
            assert torch.equal(got, expected)


def test_processor_install_then_removal_restores_output(tiny_base_dir):
    base = load_base(str(tiny_base_dir)).freeze()
    latents, t, states = unet_inputs(base)
    with torch.no_grad():
        before = base.unet(latents, t, states).sample
        previous = install_processors(base.unet)
        assert all(isinstance(p, DualPathProcessor) for p in base.unet.attn_processors.values())
        remove_processors(base.unet, previous)
        assert not any(isinstance(p, DualPathProcessor) for p in base.unet.attn_processors.values())
        assert torch.equal(base.unet(latents, t, states).sample, before)


def _one_attention(system, cross: bool):
    name = next(n for n, p in system.base.unet.attn_processors.items() if p.is_cross == cross)
    return system.base.unet.get_submodule(name[: -len(".processor")])


@pytest.mark.parametrize("cross", [False, True])
def test_dual_path_is_the_linear_blend_and_a1_is_single_path(system, cross):
    attn = _one_attention(system, cross)
    factors = random_factors(system, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ctx_dim = attn.to_k.in_features
    soft, hard = torch.randn(2, 5, ctx_dim, generator=g), torch.randn(2, 5, ctx_dim, generator=g)
    context = soft if cross else None

    def run(a, hard_states):
        return attn(h, encoder_hidden_states=context,
                    adapter=AdapterInputs(factors, hard_states, blend_self=a, blend_cross=a))

    with torch.no_grad():
        single = attn(h, encoder_hidden_states=context, adapter=AdapterInputs(factors))
        torch.testing.assert_close(run(1.0, hard), single, rtol=0, atol=0)
        vanilla = attn(h, encoder_hidden_states=hard if cross else None)
        torch.testing.assert_close(run(0.0, hard), vanilla, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(run(0.3, hard), 0.3 * single + 0.7 * vanilla, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(single, vanilla, atol=1e-4)  # the offsets do act


def test_batch_with_per_sample_offsets_equals_samples_one_by_one(system):
    base = system.base
    latents, t, states = unet_inputs(base, batch=2)
    factors = random_factors(system, 2, seed=3)
    hard = states.flip(0)
    with torch.no_grad():
        batched = base.unet(latents, t, states, cross_attention_kwargs={"adapter": AdapterInputs(
            factors, hard, 0.5, 0.5)}).sample
        for i in range(2):
            one = {k: (A[i:i + 1], B[i:i + 1]) for k, (A, B) in factors.items()}
            single = base.unet(latents[i:i + 1], t[i:i + 1], states[i:i + 1], cross_attention_kwargs={
                "adapter": AdapterInputs(one, hard[i:i + 1], 0.5, 0.5)}).sample
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-5)
        different = base.unet(latents, t, states, cross_attention_kwargs={"adapter": AdapterInputs(
            {k: (A.flip(0), B.flip(0)) for k, (A, B) in factors.items()}, hard, 0.5, 0.5)}).sample
        assert not torch.allclose(different, batched, atol=1e-4)


def _contrastive_by_hand(v, table, tau, negatives, k=1):
    """METHOD.md's InfoNCE term, written out with scalar cosines in float64.

    L_i = -log( sum_{p in P_i} exp(cos(v_i, T_p)/tau) / sum_{c in C} exp(cos(v_i, T_c)/tau) ),
    P_i the k nearest words of v_i, C the words of every P_j plus the random negatives (each once).
    """
    import math

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    rows, words = v.tolist(), table.tolist()
    positives = [sorted(range(len(words)), key=lambda j: -cos(row, words[j]))[:k] for row in rows]
    candidates = {j for p in positives for j in p} | set(negatives)
    losses = [-math.log(sum(math.exp(cos(row, words[j]) / tau) for j in p)
                        / sum(math.exp(cos(row, words[j]) / tau) for j in candidates))
              for row, p in zip(rows, positives)]
    return sum(losses) / len(losses)


def test_contrastive_and_norm_terms_match_the_formulas_by_hand(system):
    # six words in 3-D, of different norms, and three predictions: two share their nearest word
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 0.0],
                          [0.0, 1.5, 1.5], [-1.0, 0.2, 0.3]])
    v = torch.tensor([[0.9, 0.1, 0.05], [0.8, 0.3, -0.1], [0.1, 0.2, 1.0]])
    tau, count = 0.2, 4
    # the formula is checked in float64 (the term runs in its input's dtype): in float32 a loss of
    # 0.018 is the difference of two log-sum-exps near 5, and its last digits vary with the CPU's kernels
    table, v = table.double(), v.double()
    for k in (1, 2):
        for seed in (0, 1, 2):
            negatives = torch.randint(0, len(table), (count,), generator=torch.Generator().manual_seed(seed)).tolist()
            got = nn_contrastive_loss(v, table, tau, count, k, torch.Generator().manual_seed(seed))
            assert got.item() == pytest.approx(_contrastive_by_hand(v, table, tau, negatives, k), rel=1e-9)
        got = nn_contrastive_loss(v, table, tau, 0, k)
        assert got.item() == pytest.approx(_contrastive_by_hand(v, table, tau, [], k), rel=1e-9)
    # the negatives matter: the seeds above draw different words and give different losses
    losses = {round(nn_contrastive_loss(v, table, tau, count, 1, torch.Generator().manual_seed(s)).item(), 6)
              for s in range(3)}
    assert len(losses) > 1
    # norm term: relative squared distance of |v_i| from the mean norm of the real word embeddings
    mean_norm = sum(sum(x * x for x in row) ** 0.5 for row in table.tolist()) / len(table)
    by_hand = sum(((sum(x * x for x in row) ** 0.5 - mean_norm) / mean_norm) ** 2 for row in v.tolist()) / len(v)
    assert norm_loss(v, mean_norm).item() == pytest.approx(by_hand, rel=1e-9)
    # ... with the objective's target taken from the real vocabulary table of the base
    assert system.objective.target_norms == pytest.approx([system.vocab_table.norm(dim=-1).mean().item()])


def test_contrastive_loss_properties():
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    on_token = table[[3, 7]].clone()
    off_token = on_token + 0.8 * torch.randn(2, 16, generator=g)
    loss_on = nn_contrastive_loss(on_token, table, num_negatives=20, generator=torch.Generator().manual_seed(1))
    loss_off = nn_contrastive_loss(off_token, table, num_negatives=20, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss_on) and torch.isfinite(loss_off)
    assert loss_on < loss_off
    # different concepts are pushed apart: a step moves each away from the other's nearest word
    v = (table[[3, 7]] + 0.3 * table[[7, 3]]).requires_grad_()
    nn_contrastive_loss(v, table, num_negatives=0).backward()
    with torch.no_grad():
        v2 = v - 0.5 * v.grad
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    assert cos(v2[0], table[7]) < cos(v[0].detach(), table[7])
    assert cos(v2[1], table[3]) < cos(v[1].detach(), table[3])


def test_predicted_negatives_keep_concepts_sharing_a_word_apart():
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    hub = table[5]
    v = (hub + 0.2 * torch.randn(3, 16, generator=g)).requires_grad_()  # three concepts near one word
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    mean_pairwise = lambda x: (cos(x[0], x[1]) + cos(x[0], x[2]) + cos(x[1], x[2])) / 3  # noqa: E731

    def stepped(predicted_negatives):
        v.grad = None
        nn_contrastive_loss(v, table, num_negatives=0, predicted_negatives=predicted_negatives).backward()
        with torch.no_grad():
            return v - 0.05 * v.grad

    before = mean_pairwise(v.detach())
    assert mean_pairwise(stepped(True)) < before - 1e-3  # pushed apart
    # the plain term: all three sharing the hub as their only candidate costs nothing, no gradient at all
    assert torch.equal(stepped(False), v.detach()) and not v.grad.abs().any()
    # rows that are copies of one concept (a tuning batch) are not pushed apart from themselves
    one = table[[2, 2, 2]] + 0.1
    plain = nn_contrastive_loss(one, table, num_negatives=7, generator=torch.Generator().manual_seed(1))
    apart = nn_contrastive_loss(one, table, num_negatives=7, generator=torch.Generator().manual_seed(1),
                                predicted_negatives=True)
    torch.testing.assert_close(apart, plain)


def test_distinct_positives_pull_concepts_sharing_a_word_toward_different_words():
    from datencoder.regularizers import distinct_nearest

    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    v = table[5] + 0.2 * torch.randn(3, 16, generator=g)  # three concepts whose nearest word is 5
    plain, _ = nearest_tokens(v, table, 1)
    assert plain[:, 0].tolist() == [5, 5, 5]
    for k in (1, 2):
        got = distinct_nearest(v, table, k)
        assert got.shape == (3, k) and len(set(got.flatten().tolist())) == 3 * k  # no word shared
        closest = int(torch.nn.functional.cosine_similarity(v, table[5].expand_as(v)).argmax())
        assert got[closest, 0] == 5  # the row nearest to the contested word keeps it
    # copies of one concept (a tuning batch) share their word; no conflict -> the plain nearest words
    copies = torch.cat([v[:1], v[:1], table[[9]] + 0.01])
    assert distinct_nearest(copies, table, 1)[:, 0].tolist() == [5, 5, 9]
    apart = table[[3, 7, 11]] + 0.05
    torch.testing.assert_close(nn_contrastive_loss(apart, table, num_negatives=0, distinct_positives=True),
                               nn_contrastive_loss(apart, table, num_negatives=0))
    # the shared word gives no gradient in the plain term; distinct positives pull the rows apart
    v.requires_grad_()
    nn_contrastive_loss(v, table, num_negatives=0, distinct_positives=True).backward()
    with torch.no_grad():
        moved = v - 0.05 * v.grad
    cos = torch.nn.functional.cosine_similarity
    pairwise = lambda x: (cos(x[0], x[1], dim=0) + cos(x[0], x[2], dim=0) + cos(x[1], x[2], dim=0)) / 3  # noqa: E731
    assert pairwise(moved) < pairwise(v.detach()) - 1e-3


def test_diffusion_target_follows_prediction_type(system):
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), v.get_velocity(latents, noise, t))


def test_training_terms_are_finite_named_and_reach_the_encoder(system):
    pixels = torch.rand(2, 3, system.base.resolution, system.base.resolution) * 2 - 1
    terms = system.training_terms(pixels, ["a photo of S*", "S* on the beach"], torch.Generator().manual_seed(0))
    assert {"diffusion", "contrastive", "norm"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    system.encoder.zero_grad()
    sum(terms.values()).backward()
    assert system.encoder.embedding_head.weight.grad.abs().sum() > 0
    assert system.encoder.hypernetwork.maps.weight.grad.abs().sum() > 0  # B's zero-initialised maps


def test_tune_templates_replace_the_pretraining_ones_and_fields_need_them(system):
    from datencoder.errors import DatencoderError

    pixels = torch.rand(3, system.base.resolution, system.base.resolution) * 2 - 1
    cfg = system.cfg
    saved = (cfg.data.templates, cfg.tune.templates, cfg.tune.steps)
    try:
        cfg.tune.steps = 2
        cfg.data.templates = ["S*", "a picture of S*"]
        plain = personalize(system, pixels)
        cfg.data.templates = ["S*, on {a_background} background"]  # pre-training prompts with manifest fields
        with pytest.raises(DatencoderError, match="tune.templates"):
            personalize(system, pixels)
        cfg.tune.templates = ["S*", "a picture of S*"]
        tuned = personalize(system, pixels)
        torch.testing.assert_close(tuned.embedding, plain.embedding)  # the same prompts, the same result
        for name, (A, B) in tuned.factors.items():
            torch.testing.assert_close(B, plain.factors[name][1])
    finally:
        cfg.data.templates, cfg.tune.templates, cfg.tune.steps = saved


def test_tuning_with_zero_steps_returns_the_encoder_prediction(system):
    pixels = torch.rand(3, system.base.resolution, system.base.resolution) * 2 - 1
    system.cfg.tune.steps = 0
    concept = personalize(system, pixels)
    pred = system.predict(pixels.unsqueeze(0), torch.Generator().manual_seed(system.cfg.tune.seed))
    assert torch.equal(concept.embedding, pred.embedding[0])
    for name, (A, B) in concept.factors.items():
        assert torch.equal(A, pred.factors[name][0][0]) and torch.equal(B, pred.factors[name][1][0])
    system.cfg.tune.steps = 12


def test_tuning_lowers_the_loss_on_a_fixed_image(tiny_base_dir):
    system = make_system(tiny_base_dir, tune={"steps": 30, "lr_embedding": 3e-2, "lr_lora": 3e-2, "batch_size": 4})
    g = torch.Generator().manual_seed(0)
    res = system.base.resolution
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    pixels = torch.stack([xx, yy, xx * yy])  # a fixed, structured image

    def eval_loss(concept: Concept) -> float:
        gen = torch.Generator().manual_seed(123)
        latents = system.encode_latents(pixels.unsqueeze(0).expand(8, -1, -1, -1), gen)
        batch = system.objective.add_noise(latents, gen, torch.linspace(50, 950, 8).long())
        with torch.no_grad():
            terms = system.objective(batch, ["a photo of S*"] * 8, concept.embedding.unsqueeze(0),
                                     concept.batched_factors(), True)
        return float(terms["diffusion"])

    system.cfg.tune.steps = 0
    before = eval_loss(personalize(system, pixels))
    system.cfg.tune.steps = 30
    losses = []
    after = eval_loss(personalize(system, pixels, callback=lambda s, t: losses.append(t["diffusion"])))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.95 * before, (before, after)
    del g


def _same(a, b) -> bool:
    """Equal in value, type and (for tensors) dtype and shape, recursively."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _saved(folder: Path, kind: str) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    meta = json.loads((folder / f"{kind}.json").read_text())
    meta.pop("saved", None)  # the save time
    return meta, load_file(folder / f"{kind}.safetensors")


def test_concept_and_encoder_round_trip_exactly(system, tmp_path, tiny_base_dir):
    """Every field and tensor survives save -> load, and saving the loaded object writes the same files."""
    import dataclasses

    from datencoder.config import to_dict

    pixels = torch.rand(3, system.base.resolution, system.base.resolution) * 2 - 1
    system.cfg.tune.steps = 1
    concept = personalize(system, pixels)
    assert concept.factors and concept.info and concept.config and concept.base
    concept.save(tmp_path / "c")
    loaded = Concept.load(tmp_path / "c", system.base)
    for f in dataclasses.fields(Concept):
        if f.name == "source":  # where a loaded concept came from, not part of what was saved
            assert loaded.source == str(tmp_path / "c") and concept.source == ""
            continue
        assert _same(getattr(loaded, f.name), getattr(concept, f.name)), f.name
    loaded.save(tmp_path / "c2")
    assert _same(_saved(tmp_path / "c2", "concept"), _saved(tmp_path / "c", "concept"))

    info = {"steps": 3, "note": "round trip"}
    system.save(tmp_path / "enc", info=info)
    again = EncoderSystem.load(tmp_path / "enc")
    assert _same(again.encoder.state_dict(), system.encoder.state_dict())
    assert to_dict(again.cfg) == to_dict(system.cfg)
    assert (again.base.name, again.base.fingerprint) == (system.base.name, system.base.fingerprint)
    again.save(tmp_path / "enc2", info=info)
    assert _same(_saved(tmp_path / "enc2", "encoder"), _saved(tmp_path / "enc", "encoder"))
    system.cfg.tune.steps = 12


def test_clip_text_encoder_family_works_too(tiny_clip_base_dir):
    system = make_system(tiny_clip_base_dir, tune={"steps": 1})
    pixels = torch.rand(3, system.base.resolution, system.base.resolution) * 2 - 1
    concept = personalize(system, pixels)
    assert concept.hard_word.isalpha() and torch.isfinite(concept.embedding).all()


def test_library_never_imports_recipes():
    root = Path(__import__("datencoder").__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "recipes" in path.relative_to(root).parts or path.name == "__main__.py":  # entry points
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any("recipes" in n.split(".") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders


def test_any_transformers_vision_tower_works(tiny_base_dir, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                                     image_size=32, patch_size=8))
    tower.save_pretrained(tmp_path / "dino")
    base = load_base(str(tiny_base_dir), image_tower=str(tmp_path / "dino"))
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)}, "encoder": {"tower_layers": [-1, -2, -4]}})
    system = EncoderSystem(base, cfg)
    assert system.features.image_width == 3 * 24  # three pooled layers of the tower's width
    pixels = torch.rand(2, 3, base.resolution, base.resolution) * 2 - 1
    terms = system.training_terms(pixels, ["S*", "a photo of S*"], torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in terms.values())


def test_method_modules_never_import_the_emoji_wing_or_the_harness():
    """The method (every top-level module, and any subpackage other than the emoji proving
    ground, the evaluation harness and the commands) loads without ``datencoder.emoji`` or
    ``datencoder.eval``: a user with a real base never pays for, or depends on, either."""
    import subprocess
    import sys

    root = Path(__import__("datencoder").__file__).parent
    wings = {"emoji", "eval", "recipes"}
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in wings or parts[-1] == "testing":
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        modules.append(".".join(("datencoder", *parts)))
    assert "datencoder.tuning" in modules and "datencoder.pipeline" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('datencoder.emoji', 'datencoder.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
