"""Config validation at load: every value with a domain is checked in __post_init__, and a bad
one is refused in one line that names the key and its allowed range."""

from __future__ import annotations

import math

import pytest

from datencoder.config import Config, SampleConfig, apply_overrides, from_dict, load_config
from datencoder.errors import DatencoderError

BAD = [  # (override, the key and rule the message must name)
    ("tune.batch_size=0", "tune.batch_size must be >= 1"),
    ("tune.steps=-1", "tune.steps must be >= 0"),
    ("tune.lr_embedding=-1e-3", "tune.lr_embedding must be > 0"),
    ("tune.lr_lora=0", "tune.lr_lora must be > 0"),
    ("tune.lr_heads=.nan", "'tune.lr_heads' must be a finite number, got nan"),
    ("loss.tau=0", "loss.tau must be > 0"),
    ("loss.contrastive_weight=-0.1", "loss.contrastive_weight must be >= 0"),
    ("loss.num_negatives=-1", "loss.num_negatives must be >= 0"),
    ("loss.top_k_positives=0", "loss.top_k_positives must be >= 1"),
    ("loss.snr_gamma=0", "loss.snr_gamma must be > 0"),
    ("encoder.hidden_dim=0", "encoder.hidden_dim must be >= 1"),
    ("encoder.inference_timestep=-5", "encoder.inference_timestep must be >= 0"),
    ("encoder.lora_scale=.inf", "'encoder.lora_scale' must be a finite number, got inf"),
    ("encoder.targets=[]", "encoder.targets and encoder.attention_kinds must not be empty"),
    ("dual_path.blend_cross=1.5", r"dual_path.blend_cross must lie in \[0, 1\]"),
    ("data.scale_min=0", r"data.scale_min must be in \(0, 1\]"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.templates=[]", "data.templates must hold at least one"),
    ("model.placeholder=''", "model.placeholder must not be empty"),
    ("sample.steps=0", "sample.steps must be >= 1"),
    ("sample.num_images=0", "sample.num_images must be >= 1"),
    ("sample.guidance=.nan", "'sample.guidance' must be a finite number, got nan"),
    ("sample.scheduler=pndm", "sample.scheduler must be one of 'ddim', 'dpm', 'euler'"),
    ("sample.height=0", "sample.height must be >= 1"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_a_bad_value_is_refused_at_load_in_one_line(override, message):
    with pytest.raises(DatencoderError, match=message) as info:
        load_config("tiny", [override])
    assert "\n" not in str(info.value)


def test_edge_values_of_each_domain_pass():
    cfg = from_dict(Config, apply_overrides({}, [
        "tune.steps=0", "tune.batch_size=1", "loss.contrastive_weight=0", "loss.num_negatives=0",
        "data.scale_min=1", "dual_path.blend_self=0", "dual_path.blend_cross=1", "sample.guidance=0",
        "encoder.inference_timestep=0"]))
    assert cfg.tune.steps == 0 and cfg.data.scale_min == 1.0


def _emoji_cases():
    from datencoder.emoji.batches import AugmentConfig
    from datencoder.emoji.evaluator import EvaluatorArch
    from datencoder.emoji.minisd.config import UNetStageConfig, VAEStageConfig
    from datencoder.emoji.tower import TowerArch
    from datencoder.eval.baselines import DreamBoothLoRAConfig, TextualInversionConfig

    return [
        (VAEStageConfig, {"model": {"resolution": 0}}, "model.resolution must be >= 1"),
        (VAEStageConfig, {"model": {"resolution": 63}}, "model.resolution 63 must be divisible"),
        (VAEStageConfig, {"model": {"norm_num_groups": 0}}, "model.norm_num_groups must be >= 1"),
        (VAEStageConfig, {"loss": {"kl_weight": -1}}, "loss.kl_weight must be >= 0"),
        (VAEStageConfig, {"data": {"drop_prob": 1.5}}, r"data.drop_prob must be in \[0, 1\]"),
        (VAEStageConfig, {"data": {"max_length": 0}}, "data.max_length must be >= 1"),
        (UNetStageConfig, {"model": {"block_out_channels": [64, 100]}}, "must be multiples of model.norm_num_groups"),
        (UNetStageConfig, {"diffusion": {"prediction_type": "sample"}}, "diffusion.prediction_type must be one of"),
        (UNetStageConfig, {"diffusion": {"snr_gamma": -1}}, "diffusion.snr_gamma must be >= 0"),
        (UNetStageConfig, {"diffusion": {"zero_terminal_snr": True, "prediction_type": "epsilon"}},
         "diffusion.zero_terminal_snr needs"),
        (UNetStageConfig, {"grid": {"steps": 0}}, "grid.steps must be >= 1"),
        (UNetStageConfig, {"cache_parts": ["text", "images"]}, "cache_parts may hold"),
        (TowerArch, {"patch_size": 0}, "model.patch_size must be >= 1"),
        (TowerArch, {"hidden_size": 100, "num_attention_heads": 3}, "model.hidden_size of model.num_attention_heads"),
        (EvaluatorArch, {"concept_scale": 0}, "model.concept_scale must be > 0"),
        (EvaluatorArch, {"widths": []}, "model.widths must be a non-empty list"),
        (AugmentConfig, {"blur_prob": 2}, r"augment.blur_prob must be in \[0, 1\]"),
        (TextualInversionConfig, {"lr": -1}, "textual_inversion.lr must be > 0"),
        (TextualInversionConfig, {"batch_size": 0}, "textual_inversion.batch_size must be >= 1"),
        (DreamBoothLoRAConfig, {"rank": 0}, "dreambooth_lora.rank must be >= 1"),
        (DreamBoothLoRAConfig, {"steps": -1}, "dreambooth_lora.steps must be >= 0"),
        (DreamBoothLoRAConfig, {"targets": ["to_x"]}, "dreambooth_lora.targets may hold"),
    ]


def test_emoji_and_baseline_configs_refuse_bad_values_in_one_line():
    for cls, data, message in _emoji_cases():
        with pytest.raises(DatencoderError, match=message) as info:
            from_dict(cls, data)
        assert "\n" not in str(info.value), (cls.__name__, data)
        cls()  # the defaults themselves pass


def test_sample_config_schedulers_are_the_pipelines():
    from datencoder.config import SCHEDULER_NAMES
    from datencoder.pipeline import SCHEDULERS

    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
    assert SampleConfig().height is None and math.isfinite(SampleConfig().guidance)
