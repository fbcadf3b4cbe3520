"""Evaluation harness and baselines on the tiny model with a random-weight evaluator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from datencoder.attention import AdapterInputs
from datencoder.base import load_base
from datencoder.eval.baselines import (DreamBoothConfig, DreamBoothLoRAConfig, dreambooth_unet, TextualInversionConfig, add_peft_lora, dreambooth_lora,
                                  peft_factors, textual_inversion)
from datencoder.config import Config, from_dict, load_config, to_dict
from datencoder.emoji.data import BACKGROUNDS, POSITIONS, SIZES, STYLES
from datencoder.errors import DatencoderError
from datencoder.eval.config import EvalConfig, TargetsConfig
from datencoder.eval.harness import run_evaluation
from datencoder.eval.records import read_records
from datencoder.eval.scoring import parse_prompt
from datencoder.eval.targets import select_targets
from datencoder.emoji.evaluator import EvaluatorArch, EvaluatorNet, save_evaluator
from datencoder.export import EMBEDDING_FILE, LORA_FILE, export_concept
from datencoder.pipeline import ConceptPipeline
from datencoder.system import EncoderSystem

FIXTURES = Path(__file__).parent / "fixtures"
CONCEPTS = {"1f34e": ("noto_1f34e.png", "food-drink", "heldout_concept"),
            "1f600": ("twemoji_1f600.png", "smileys-emotion", "heldout_style")}


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def emoji_root(tmp_path_factory):
    """A 2-concept manifest in the emoji layout (fluent3d sources taken from the fixtures)."""
    root = tmp_path_factory.mktemp("emoji")
    (root / "sources" / "fluent3d").mkdir(parents=True)
    rows = []
    for concept, (fixture, category, split) in CONCEPTS.items():
        shutil.copy(FIXTURES / fixture, root / "sources" / "fluent3d" / f"{concept}.png")
        rows.append({"file": f"images/fluent3d/{concept}_0.png", "source": f"sources/fluent3d/{concept}.png",
                     "concept": concept, "name": concept, "category": category, "style": "fluent3d",
                     "split": split})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    arch = EvaluatorArch(stem_channels=4, widths=[8, 8], global_widths=[4, 4], layout_hidden=8, embed_dim=8)
    labels = {"concept": ["1f34e", "1f600", "1f697"], "style": list(STYLES), "background": list(BACKGROUNDS),
              "position": list(POSITIONS), "size": list(SIZES)}
    torch.manual_seed(0)
    net = EvaluatorNet(arch, {h: len(v) for h, v in labels.items()})
    return save_evaluator(net, labels, tmp_path_factory.mktemp("evaluator"))


@pytest.fixture(scope="module")
def encoder_dir(tiny_base_dir, tmp_path_factory):
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hidden_dim": 32}, "tune": {"batch_size": 2}})
    return EncoderSystem(load_base(str(tiny_base_dir)), cfg).save(tmp_path_factory.mktemp("encoder"))


def test_parse_prompt_reads_the_caption_vocabulary():
    assert parse_prompt("S*") == {}
    assert parse_prompt("S*, on a blue background") == {"background": "blue"}
    assert parse_prompt("S*, small, top left") == {"size": "small", "position": "top left"}
    assert parse_prompt("S*, large, center, on an orange background") == {
        "size": "large", "position": "center", "background": "orange"}
    assert parse_prompt("S*, top, on a teal background") == {"position": "top"}  # unknown colour: not stated


def test_select_targets_groups_filters_and_explicit_images(emoji_root):
    manifest = str(emoji_root / "manifest.jsonl")
    groups = [{"name": "heldout", "split": "heldout_concept"}, {"name": "heldin", "split": "heldout_style"}]
    cfg = from_dict(TargetsConfig, {"manifest": manifest, "groups": groups})
    targets = select_targets(cfg)
    assert [(t.concept, t.group, t.category) for t in targets] == [
        ("1f34e", "heldout", "food-drink"), ("1f600", "heldin", "smileys-emotion")]
    assert all(Path(t.image).is_file() and "sources" in t.image for t in targets)
    only = from_dict(TargetsConfig, {"manifest": manifest, "groups": [{**groups[0], "categories": ["flags"]}],
                                     "images": [str(emoji_root / "sources/fluent3d/1f600.png")]})
    assert [(t.concept, t.group) for t in select_targets(only)] == [("1f600", "images")]
    with pytest.raises(DatencoderError, match="no evaluation targets"):
        select_targets(TargetsConfig())


def test_method_per_category_keeps_the_same_subset_in_every_shard(tmp_path):
    from datencoder.eval.config import MethodConfig
    from datencoder.eval.targets import method_targets

    rows = [{"file": f"images/{style}/{c}{i}.png", "source": f"sources/{style}/{c}{i}.png", "concept": f"{c}{i}",
             "name": f"{c} {i}", "category": c, "style": style, "split": "heldout_concept"}
            for c in ("flags", "objects", "symbols") for i in range(4) for style in ("noto", "fluent3d")]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = [{"name": "seen", "style": "noto", "per_category": 3}, {"name": "unseen", "style": "fluent3d",
                                                                     "per_category": 2}]
    cfg = from_dict(TargetsConfig, {"manifest": str(tmp_path / "manifest.jsonl"), "groups": groups})
    everything = select_targets(cfg)
    assert len(everything) == 15
    first = MethodConfig(name="long", kind="textual_inversion", per_category=1)
    subset = method_targets(first, everything)
    firsts: dict = {}
    for t in everything:  # the first target picked for each (group, category)
        firsts.setdefault((t.group, t.category), t.image)
    assert [t.image for t in subset] == list(firsts.values())
    assert len(method_targets(MethodConfig(name="two", kind="textual_inversion", per_category=2), everything)) == 12
    for n in (2, 4, 7):  # the processes of an n-way shard run exactly the same subset between them
        shards = [method_targets(first, select_targets(cfg, (k, n))) for k in range(n)]
        assert sorted(t.image for s in shards for t in s) == sorted(t.image for t in subset)
    with pytest.raises(DatencoderError, match="per_category must be >= 1"):
        MethodConfig(name="x", kind="textual_inversion", per_category=0)


def _pixels(base, seed=0):
    return torch.rand(3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_textual_inversion_learns_only_the_embedding(base, tmp_path):
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("emoji")].clone()
    concept = textual_inversion(base, _pixels(base), TextualInversionConfig(steps=2, batch_size=2, lr=0.1))
    assert concept.factors == {} and concept.blend_self == concept.blend_cross == 1.0
    assert not torch.allclose(concept.embedding, init) and (concept.embedding - init).abs().max() < 0.3
    images = ConceptPipeline(base, concept)(["S*, small"], num_images_per_prompt=1, num_inference_steps=2,
                                            guidance_scale=2.0).images
    assert images[0].size == (base.resolution, base.resolution)
    out = export_concept(concept, tmp_path / "ti")
    assert (out / EMBEDDING_FILE).is_file() and not (out / LORA_FILE).exists()


def test_peft_factors_reproduce_the_peft_unet(base):
    keys = sorted(k for k in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                              "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"))
    peft_unet = add_peft_lora(base.unet, keys, rank=2, alpha=6.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    states = base.encode_prompt(base.tokenize(["a photo of a red dog"] * 2))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        vanilla = base.unet(latents, t, states).sample
        assert torch.equal(peft_unet(latents, t, states).sample, vanilla)  # B = 0: the identity
        for name, p in peft_unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        reference = peft_unet(latents, t, states).sample
        factors, scale = peft_factors(peft_unet, keys)
        assert scale == 3.0 and set(factors) == set(keys)
        batched = {k: (A.unsqueeze(0), B.unsqueeze(0)) for k, (A, B) in factors.items()}
        ours = base.unet(latents, t, states, cross_attention_kwargs={
            "adapter": AdapterInputs(factors=batched, scale=scale)}).sample
    assert not torch.allclose(reference, vanilla, atol=1e-4)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_dreambooth_lora_concept_generates_and_exports(base, tmp_path):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    cfg = DreamBoothLoRAConfig(steps=2, batch_size=2, rank=2, rare_word="ghost", lr=1e-2)
    concept = dreambooth_lora(base, _pixels(base, 1), cfg)
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())  # base untouched
    assert concept.hard_word == "ghost" and concept.info["prompt_placeholder"] == "S* emoji"
    ghost = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("ghost")]
    assert torch.equal(concept.embedding, ghost.float())
    assert concept.factors and all(A.shape[0] == 2 == B.shape[1] for A, B in concept.factors.values())
    assert any(B.abs().max() > 0 for _, B in concept.factors.values())
    images = ConceptPipeline(base, concept)(["S* emoji, on a red background"], num_images_per_prompt=1,
                                            num_inference_steps=2).images
    assert len(images) == 1
    out = export_concept(concept, tmp_path / "db")
    assert (out / LORA_FILE).is_file()
    with pytest.raises(DatencoderError, match="not a single token"):
        dreambooth_lora(base, _pixels(base), DreamBoothLoRAConfig(steps=1, rare_word="zzqx"))


def test_whole_unet_dreambooth_tunes_a_copy_of_every_unet_weight(base):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    cfg = DreamBoothConfig(steps=2, batch_size=3, rare_word="ghost", lr=1e-3)
    concept, tuned = dreambooth_unet(base, _pixels(base, 1), cfg)
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())  # base untouched
    assert tuned.unet is not base.unet and tuned.text_encoder is base.text_encoder
    changed = {k for k, v in tuned.unet.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert "conv_in.weight" in changed and any("resnets" in k for k in changed)  # not only attention
    assert concept.factors == {} and concept.hard_word == "ghost" and concept.info["prompt_placeholder"] == "S* emoji"
    prompt = ["S* emoji, on a red background"]
    mine = ConceptPipeline(tuned, concept)(prompt, num_images_per_prompt=1, num_inference_steps=2, seed=0).images
    plain = ConceptPipeline(base, concept)(prompt, num_images_per_prompt=1, num_inference_steps=2, seed=0).images
    assert mine[0].tobytes() != plain[0].tobytes()
    with pytest.raises(DatencoderError, match="not a single token"):
        dreambooth_unet(base, _pixels(base), DreamBoothConfig(steps=1, rare_word="zzqx"))
    with pytest.raises(DatencoderError, match="dreambooth.lr must be > 0"):
        DreamBoothConfig(lr=0)


def _eval_config(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir, out) -> EvalConfig:
    data = {
        "base": str(tiny_base_dir), "evaluator": str(evaluator_dir), "output_dir": str(out),
        "prompts": ["S*, on a blue background", "S*, small, top left"], "seeds": [0],
        "sample_steps": 2, "guidance": 2.0, "grids": 1,
        "targets": {"manifest": str(emoji_root / "manifest.jsonl"),
                    "groups": [{"name": "heldout", "split": "heldout_concept"},
                               {"name": "heldin", "split": "heldout_style"}]},
        "methods": [
            {"name": "ours-1", "kind": "ours", "encoder": str(encoder_dir), "steps": 1},
            {"name": "ti-2", "kind": "textual_inversion", "steps": 2, "overrides": {"batch_size": 2}},
            {"name": "db-2", "kind": "dreambooth_lora", "steps": 2,
             "overrides": {"batch_size": 2, "rank": 2, "rare_word": "ghost"}, "categories": ["food-drink"]},
            {"name": "dbu-2", "kind": "dreambooth", "steps": 2,
             "overrides": {"batch_size": 2, "rare_word": "ghost"}, "categories": ["food-drink"]},
        ],
    }
    return from_dict(EvalConfig, data)


def test_harness_writes_reports_and_resumes(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir, tmp_path):
    from datencoder.recipes.cli import main

    out = tmp_path / "eval"
    cfg = _eval_config(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir, out)
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["evaluate", str(config_file)]) == 0
    records = read_records(out / "records.jsonl")
    assert len(records) == (2 + 2 + 1 + 1) * 2  # db-2 and dbu-2 only see their category's target
    assert {(r["method"], r["concept"]) for r in records if r["method"] == "db-2"} == {("db-2", "1f34e")}
    for r in records:
        assert -1.0001 <= r["identity"] <= 1.0001 and r["top1"] in (0, 1) and r["top5"] in (0, 1)
        assert r["top5"] >= r["top1"] and r["seconds"] > 0 and r["peak_mb"] > 0
        stated = parse_prompt(r["prompt"])
        assert {a for a in ("background", "position", "size") if r[f"{a}_ok"] is not None} == set(stated)
        assert (out / r["file"]).is_file()
    text = (out / "results.md").read_text()
    assert all(f"| {m} |" in text for m in ("ours-1", "ti-2", "db-2", "dbu-2")) and "heldin" in text
    assert Image.open(out / "scatter.png").size == (900, 520)
    assert list(out.glob("grid_0_*.png"))

    again = run_evaluation(cfg)
    assert again["ran"] == [] and len(again["skipped"]) == 6
    def key(r):
        return r["method"], r["target"], r["prompt_index"], r["seed"]

    # the per-method files hold what records.jsonl merges (the report orders by the config)
    assert sorted(read_records(out), key=key) == sorted(records, key=key)
    assert [r["method"] for r in records] == sorted((r["method"] for r in records),
                                                   key=["ours-1", "ti-2", "db-2", "dbu-2"].index)
    # a crash mid-pair leaves a partial pair: only that pair is redone
    (ti_file,) = [f for f in (out / "records" / "ti-2").glob("*.jsonl") if "1f600" in read_records(f)[0]["target"]]
    partial = [r for r in read_records(ti_file) if not r["prompt_index"]]
    ti_file.write_text("".join(json.dumps(r) + "\n" for r in partial))
    redo = run_evaluation(cfg, methods=["ti-2"])
    assert [m for m, _ in redo["ran"]] == ["ti-2"] and "1f600" in redo["ran"][0][1]

    def untimed(rs):  # the redone pair has new timings; everything else is reproduced exactly
        return sorted(({k: v for k, v in r.items() if k not in ("seconds", "peak_mb")} for r in rs), key=key)

    assert untimed(read_records(out)) == untimed(records)


def test_shards_split_the_targets_between_processes(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir,
                                                    tmp_path):
    from datencoder.eval.records import parse_shard

    cfg = _eval_config(tiny_base_dir, emoji_root, evaluator_dir, encoder_dir, tmp_path / "eval")
    cfg.methods = [m for m in cfg.methods if m.name == "ti-2"]
    first = run_evaluation(cfg, shard=parse_shard("0/2"))
    second = run_evaluation(cfg, shard=parse_shard("1/2"))
    assert len(first["ran"]) == len(second["ran"]) == 1 and first["ran"] != second["ran"]
    assert len(read_records(tmp_path / "eval")) == 2 * 2  # both targets x 2 prompts, no overlap
    assert run_evaluation(cfg)["ran"] == []  # the unsharded run finds every pair done
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(DatencoderError, match="shard must be K/N"):
            parse_shard(bad)


@pytest.mark.parametrize("kind", ["textual_inversion", "dreambooth_lora", "dreambooth"])
def test_continued_baseline_equals_a_straight_run(base, kind):
    """ti-100 -> ti-500 in the harness continues one run: the result must be the straight run's."""
    from datencoder.eval.baselines import OptimisationRun

    if kind == "dreambooth":  # the concept is fixed; the tuned UNet is the result
        make = lambda n: DreamBoothConfig(steps=n, batch_size=3, lr=1e-3, rare_word="ghost")  # noqa: E731
        pixels = _pixels(base)
        straight = dreambooth_unet(base, pixels, make(3))[1].unet.state_dict()
        run = OptimisationRun()
        first = {k: v.clone() for k, v in dreambooth_unet(base, pixels, make(1), run=run)[1].unet.state_dict().items()}
        continued = dreambooth_unet(base, pixels, make(3), run=run)[1].unet.state_dict()
        assert run.steps == 3 and all(torch.equal(continued[k], v) for k, v in straight.items())
        assert any(not torch.equal(first[k], v) for k, v in straight.items())
        return
    if kind == "textual_inversion":
        fn, make = textual_inversion, lambda n: TextualInversionConfig(steps=n, batch_size=2, lr=0.05)
    else:
        fn, make = dreambooth_lora, lambda n: DreamBoothLoRAConfig(steps=n, batch_size=2, rank=2, lr=0.05,
                                                                    rare_word="ghost")
    pixels = _pixels(base)
    straight = fn(base, pixels, make(3))
    run = OptimisationRun()
    first = fn(base, pixels, make(1), run=run)
    assert run.steps == 1 and run.seconds > 0
    continued = fn(base, pixels, make(3), run=run)
    assert run.steps == 3 and continued.info["tuning_s"] >= first.info["tuning_s"]
    assert torch.equal(continued.embedding, straight.embedding)
    assert continued.factors.keys() == straight.factors.keys()
    for key, (a, b) in straight.factors.items():
        assert torch.equal(continued.factors[key][0], a) and torch.equal(continued.factors[key][1], b)
    if kind == "textual_inversion":
        assert not torch.equal(first.embedding, straight.embedding)
    else:
        assert any(not torch.equal(first.factors[k][1], b) for k, (_, b) in straight.factors.items())
    # other settings (or fewer steps) start afresh instead of continuing
    fresh = fn(base, pixels, make(2), run=run)
    assert run.steps == 2 and torch.equal(fresh.embedding, fn(base, pixels, make(2)).embedding)


def test_paired_deltas_are_per_target_differences():
    from datencoder.eval.report import paired_deltas, results_markdown

    def rec(method, target, identity, ok):
        return {"method": method, "target": target, "group": "g", "identity": identity, "top1": 0, "top5": 0,
                "style_ok": 0, "background_ok": ok, "position_ok": None, "size_ok": None, "seconds": 1.0,
                "peak_mb": 1.0}

    records = [rec("floor", "a", 0.2, 0), rec("floor", "b", 0.6, 1),
               rec("m", "a", 0.3, 1), rec("m", "b", 0.8, 1), rec("m", "c", 0.9, 1)]  # c: no floor record
    deltas = paired_deltas(records, "floor")
    mean, sem, n = deltas["m"]["identity"]
    assert n == 2 and mean == pytest.approx(0.15) and sem == pytest.approx(0.05)
    assert deltas["m"]["editability"][:2] == pytest.approx((0.5, 0.5))
    text = results_markdown(records, paired_with="floor")
    assert "## Paired with `floor`" in text and "| m | 2 | +0.150 ± 0.050 | +0.500 ± 0.500 | identity + |" in text
    assert paired_deltas(records, "absent") == {}
    # two methods on a subset of the floor's targets get their own table, with every method that
    # covers that subset, paired on it alone
    records += [rec("floor", "c", 0.9, 1), rec("long1", "a", 0.4, 0), rec("long1", "b", 0.6, 0),
                rec("long2", "a", 0.25, 1), rec("long2", "b", 0.7, 1)]
    text = results_markdown(records, paired_with="floor")
    subset = text.split("on the 2 targets of `long1`, `long2`")[1]
    assert "| m | 2 | +0.150 ± 0.050 | +0.500 ± 0.500 | identity + |" in subset
    assert "| long1 | 2 | +0.100 ± 0.100 | -0.500 ± 0.500 | none |" in subset
    assert text.count("## Paired with") == 2


def test_shipped_eval_config_lists_every_method():
    cfg = load_config("eval_minisd", cls=EvalConfig)
    kinds = {m.kind for m in cfg.methods}
    assert kinds == {"ours", "textual_inversion", "dreambooth_lora"}
    assert len(cfg.prompts) >= 8 and all(parse_prompt(p) for p in cfg.prompts[1:])
    steps = {(m.kind, m.steps) for m in cfg.methods}
    assert {("textual_inversion", s) for s in (100, 500, 2000)} <= steps
    assert {("dreambooth_lora", s) for s in (50, 200, 800)} <= steps
    assert {("ours", s) for s in (0, 4, 12, 50)} <= steps


def test_manifest_category_filter_for_single_domain_pretraining(emoji_root):
    from datencoder.dataset import ImageFolderDataset, read_manifest_files

    manifest = emoji_root / "manifest.jsonl"
    splits = ["heldout_concept", "heldout_style"]
    assert len(read_manifest_files(manifest, splits, use_source=True)) == 2
    only = read_manifest_files(manifest, splits, use_source=True, categories=["smileys-emotion"])
    assert [p.name for p in only] == ["1f600.png"]
    with pytest.raises(DatencoderError, match="no images"):
        ImageFolderDataset("", 32, ["S*"], manifest=manifest, splits=splits, use_source=True, categories=["flags"])
    with pytest.raises(DatencoderError, match="needs a manifest"):
        ImageFolderDataset(emoji_root, 32, ["S*"], categories=["flags"])


def test_missing_encoder_fails_before_any_work(tiny_base_dir, emoji_root, evaluator_dir, tmp_path):
    """Nothing is written, not even the output folder or its setup files, before the check fails."""
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "eval", tmp_path / "existing"):
        cfg = _eval_config(tiny_base_dir, emoji_root, evaluator_dir, tmp_path / "nowhere", out)
        with pytest.raises(DatencoderError, match=r"no pre-trained encoder for ours-1 \("):
            run_evaluation(cfg)
    assert not (tmp_path / "eval").exists()
    assert list((tmp_path / "existing").iterdir()) == []


@pytest.mark.parametrize("data, message", [
    ({"sample_steps": 0}, "sample_steps must be >= 1"),
    ({"guidance": float("nan")}, "'guidance' must be a finite number"),
    ({"scheduler": "plms"}, "scheduler must be one of"),
    ({"grids": -1}, "grids must be >= 0"),
    ({"seeds": [-1]}, "every evaluation seed"),
    ({"targets": {"groups": [{"name": "g"}]}}, "targets.groups need targets.manifest"),
    ({"targets": {"manifest": "m.jsonl", "groups": [{"name": "g", "per_category": 0}]}}, "per_category must be >= 1"),
    ({"targets": {"class_words": "c.json"}}, "set targets.folder too"),
    ({"targets": {"seed": -3}}, "targets.seed"),
    ({"methods": [{"name": "m", "kind": "textual_inversion", "steps": -1}]}, "steps must be >= 0"),
])
def test_eval_config_rejects_out_of_domain_values_at_load(data, message):
    with pytest.raises(DatencoderError, match=message):
        from_dict(EvalConfig, data)


def test_eval_config_schedulers_are_the_pipelines():
    from datencoder.eval.config import SCHEDULERS
    from datencoder.pipeline import SCHEDULERS as PIPELINE_SCHEDULERS

    assert set(SCHEDULERS) == set(PIPELINE_SCHEDULERS)


def test_results_claims_reads_paired_differences_and_the_idle_timings(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_claims", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "results_claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)

    def rec(method, target, identity, ok, group="g"):
        return {"method": method, "target": target, "group": group, "identity": identity, "top1": 0, "top5": 0,
                "style_ok": 0, "background_ok": ok, "position_ok": None, "size_ok": None, "seconds": 1.0,
                "peak_mb": 1.0}

    records = [rec("floor", t, 0.5, 1) for t in "abcd"]
    records += [rec("ours", t, 0.6 + 0.01 * i, 1) for i, t in enumerate("abcd")]  # +0.1 .. +0.13: holds
    records += [rec("ti", t, 0.7, 0) for t in "ab"]  # above ours on its two targets, less editable
    speed = {"machine": "m", "date": "d", "rows": [{"method": "ours", "seconds": 2.0},
                                                     {"method": "ti-100", "extrapolated_seconds": {"ti": 100.0}}]}
    lines = claims.claims(records, "ours", "floor", "ti", speed)
    text = "\n".join(lines)
    assert "**identity over the floor** Δ +0.115 ± 0.006 (n = 4): holds" in text
    assert "**editability not more than 0.05 below the floor** Δ +0.000 ± 0.000 (n = 4): holds" in text
    # one-sided: more editable than the floor keeps editability; 0.1 below it does not
    more = [dict(r, background_ok=1) for r in records if r["method"] != "floor"] + \
        [dict(r, background_ok=0) for r in records if r["method"] == "floor"]
    assert "below the floor** Δ +1.000 ± 0.000 (n = 4): holds" in "\n".join(claims.claims(more, "ours", "floor", "ti", None))
    assert "identity at least `ti`'s** (ours − ti, paired) Δ -0.095 ± 0.005 (n = 2): does not hold, beyond 2 s.e." in text
    assert "2.00 s against 100.0 s (1/50" in text and text.endswith("holds")
    # the top-5 share: the mean over targets of each target's share of images (a: 2 of 2, b: 0 of 2, c: 0 of
    # 4 -> 1/3), not the pooled share of images (2 of 8); a target without a concept class is left out
    top = [dict(rec("ours", "a", 0.6, 1), top5=1)] * 2 + [dict(rec("ours", "b", 0.6, 1), top5=0)] * 2
    top += [dict(rec("ours", "c", 0.6, 1), top5=0)] * 4 + [dict(rec("ours", "x", 0.6, 1), top5=None)]
    mean, sem, n = claims.top5_share(top, "ours")
    assert (mean, n) == (pytest.approx(1 / 3), 3) and sem == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)
    text = "\n".join(claims.claims(records + top, "ours", "floor", "ti", None, top5_target=0.5))
    assert "**concept top-5 at least 50%**" in text and "(n = 4 targets; `floor`: 0.0%): does not hold" in text
    (tmp_path / "records.jsonl").write_text("")
    assert claims.main(["--records", str(tmp_path / "records.jsonl")]) == 2
    assert "no evaluation records" in capsys.readouterr().err
