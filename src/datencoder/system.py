"""The encoder system: base model + frozen feature paths + tuning encoder + objective.

One object wires the paper's components together for both pre-training (``training_terms``)
and personalisation (``predict``; the tuning loop lives in ``tuning.py``). Encoders are saved
as a folder (``encoder.safetensors`` + ``encoder.json``) that records the resolved config and
the base model's identity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .attention import target_layer_shapes
from .base import BaseModel, load_base
from .conditioning import text_vocabulary
from .config import Config, from_dict, to_dict
from .encoder import EncoderOutput, TuningEncoder, check_head_size
from .errors import DatencoderError
from .features import FeatureExtractor
from .io import (ASSETS, artifact_dir, atomic_dir, check_base, check_replaceable, load_tensors, read_json,
                 save_tensors_atomic, write_json_atomic)
from .objective import NoisyLatents, Objective
from .prepare import prepare_base

__all__ = ["EncoderSystem", "encoder_path", "resolve_encoder", "DEFAULT_ENCODER", "DEFAULT_ENCODER_DIR",
           "SHIPPED_ENCODERS"]

KIND = "encoder"
DEFAULT_ENCODER = "minisd-emoji-encoder"
"""The name of the shipped encoder on the command line (like the base's ``minisd-emoji``)."""
DEFAULT_ENCODER_DIR = ASSETS / DEFAULT_ENCODER
"""The encoder pre-trained on the embedded default base model (the world base), shipped in the
package: the factorized hypernetwork with paired pre-training on clean inputs
(``minisd_encoder_pairs_clean.yaml``; docs/results.md)."""
SHIPPED_ENCODERS = {DEFAULT_ENCODER: DEFAULT_ENCODER_DIR,
                    "minisd-emoji-encoder-v1": ASSETS / "minisd-emoji-encoder-v1",
                    "minisd-emoji-encoder-basis": ASSETS / "minisd-emoji-encoder-basis"}
"""Encoders shipped in the package, by name. The two earlier ones were pre-trained for the earlier
base ``minisd-emoji-v1`` (which they load): ``minisd-emoji-encoder-v1`` (the per-sample hypernetwork,
``minisd_encoder_full_hypernet.yaml``, the previous default) and ``minisd-emoji-encoder-basis``
(``minisd_encoder.yaml``: an r x r core on a learned basis); reports/results_v1.md measures them."""


def encoder_path(name: str | Path) -> Path:
    """The folder an encoder name stands for: the shipped encoder's name, or a folder."""
    return SHIPPED_ENCODERS.get(str(name)) or Path(name).expanduser()


def resolve_encoder(name: str | Path) -> Path:
    """The folder of an encoder given by folder or by the shipped name; one-line error if absent."""
    from .errors import DatencoderError

    path = artifact_dir(encoder_path(name))
    if not path.is_dir():
        raise DatencoderError(f"encoder folder {name} not found; pass --encoder a folder written by "
                              f"'datencoder pretrain' or the shipped '{DEFAULT_ENCODER}'")
    return path


class EncoderSystem:
    def __init__(self, base: BaseModel, cfg: Config, encoder: TuningEncoder | None = None):
        shapes = target_layer_shapes(base.unet, cfg.encoder.targets, cfg.encoder.attention_kinds)
        if encoder is None:  # a hypernetwork past the size limit is refused before anything is built
            check_head_size(cfg.encoder, shapes, sum(p.numel() for p in base.unet.parameters()))
        self.base = base
        self.cfg = cfg
        # the real-word table is taken before the placeholder is added, so S* is never a neighbour
        self.vocab_ids, self.vocab_table = text_vocabulary(base, cfg.loss.whole_words_only)
        self.token_id = prepare_base(base, cfg.model.token).token_id
        self.features = FeatureExtractor(base, cfg.encoder)
        if encoder is None:
            encoder = TuningEncoder(cfg.encoder, self.features.width, self.vocab_table.shape[1], shapes,
                                    init_embedding=self.vocab_table.mean(0),
                                    seed=cfg.train.seed)  # the run's seed draws the basis
        # the encoder and its heads follow the base's device but stay fp32 (trainable; autocast may
        # run their matmuls in half precision, their weights and optimizer state stay fp32)
        self.encoder = encoder.to(device=self.device)
        self.objective = Objective(base, cfg, self.token_id, self.vocab_ids, self.vocab_table)

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- building blocks ------------------------------------------------------------------
    def encode_latents(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents [N, C, h, w] (``BaseModel.encode_latents``)."""
        return self.base.encode_latents(pixels, generator)

    def run_encoder(self, pixels: Tensor, batch: NoisyLatents) -> EncoderOutput:
        feats = self.features(pixels, batch.noisy, batch.timesteps)
        return self.encoder(feats, batch.timesteps)

    # -- pre-training ---------------------------------------------------------------------
    def training_terms(self, pixels: Tensor, prompts: list[str],
                       generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Named, weighted loss terms of one pre-training batch (prompts contain S*)."""
        return self.training_step(pixels, prompts, generator)[0]

    def training_step(self, pixels: Tensor, prompts: list[str], generator: torch.Generator | None = None,
                      target: Tensor | None = None) -> tuple[dict[str, Tensor], EncoderOutput]:
        """The loss terms and the encoder's predictions (pre-training watches them for collapse).

        ``target`` (paired pre-training, ``data.pair_by``): other renders of the same concepts,
        [N, 3, H, W]; the encoder sees ``pixels`` (noised at the target's timesteps) and the loss
        reconstructs ``target``. Without it the loss reconstructs ``pixels`` themselves.
        """
        latents = self.encode_latents(pixels, generator)
        batch = self.objective.add_noise(latents, generator)
        if target is None:
            out = self.run_encoder(pixels, batch)
        else:
            if target.shape != pixels.shape:
                raise DatencoderError(f"pair targets {tuple(target.shape)} do not match the inputs "
                                      f"{tuple(pixels.shape)}; both must be [N, 3, H, W] at one resolution")
            out = self.run_encoder(pixels, batch)  # the encoder's view: the input, noised
            batch = self.objective.add_noise(self.encode_latents(target, generator), generator, batch.timesteps)
        dual = self.cfg.dual_path.enabled and self.cfg.dual_path.in_pretraining
        return self.objective(batch, prompts, out.embedding, out.factors, dual, generator), out

    # -- personalisation ------------------------------------------------------------------
    @torch.no_grad()
    def predict_features(self, pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Features of concept images at the fixed inference timestep: ([N, width], timesteps [N])."""
        latents = self.encode_latents(pixels, generator)
        t = self.cfg.encoder.inference_timestep
        if t is None:
            t = self.base.scheduler.config.num_train_timesteps // 2
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
        batch = self.objective.add_noise(latents, generator, timesteps)
        return self.features(pixels, batch.noisy, batch.timesteps), batch.timesteps

    @torch.no_grad()
    def predict(self, pixels: Tensor, generator: torch.Generator | None = None) -> EncoderOutput:
        """The encoder's prediction for concept images at the fixed inference timestep."""
        return self.encoder(*self.predict_features(pixels, generator))

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, info: dict | None = None) -> Path:
        """Write the encoder folder whole (one swap, ``io.atomic_dir``); non-finite weights are refused."""
        directory = Path(directory)
        check_replaceable(directory, (f"{KIND}.json", f"{KIND}.safetensors"), KIND, option="encoder folder")
        with atomic_dir(directory) as tmp:
            save_tensors_atomic(tmp / f"{KIND}.safetensors", self.encoder.state_dict(), KIND)
            write_json_atomic(tmp / f"{KIND}.json", {
                "kind": KIND,
                "config": to_dict(self.cfg),
                "base": {"name": self.base.name, "fingerprint": self.base.fingerprint},
                "feature_width": self.features.width,
                "token_dim": self.encoder.token_dim,
                "info": info or {},
            })
        return directory

    @classmethod
    def load(cls, directory: str | Path, base: BaseModel | None = None, overrides: dict | None = None, *,
             device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> "EncoderSystem":
        """Load a saved encoder (a folder, or the shipped encoder's name); the base model is loaded
        from its config (on ``device``, frozen weights in ``dtype``, default fp32) unless given."""
        directory = resolve_encoder(directory)
        meta = read_json(directory / f"{KIND}.json", KIND)
        state = load_tensors(directory / f"{KIND}.safetensors", KIND)
        cfg_data = meta.get("config")
        if not isinstance(cfg_data, dict) or not isinstance(meta.get("base"), dict):
            from .errors import DatencoderError

            raise DatencoderError(f"{directory / f'{KIND}.json'} lacks its 'config' or 'base' mapping; "
                                  "re-train or re-download the encoder")
        # encoders saved before encoder.hypernet_mode existed are all the shared-basis design
        cfg_data.setdefault("encoder", {}).setdefault("hypernet_mode", "core")
        for section, values in (overrides or {}).items():
            cfg_data[section] = {**cfg_data.get(section, {}), **values}
        cfg = from_dict(Config, cfg_data)
        if base is None:
            base = load_base(cfg.model.pretrained, cfg.model.image_tower, revision=cfg.model.revision,
                             variant=cfg.model.variant, torch_dtype=dtype, device=device)
        check_base(f"encoder {directory}", meta["base"], base)
        system = cls(base, cfg)
        _check_state(directory, system.encoder.state_dict(), state)
        system.encoder.load_state_dict(state)
        return system


def _check_state(directory: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """The saved tensors must be exactly those the folder's config builds: names and shapes."""
    from .errors import DatencoderError

    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise DatencoderError(f"encoder {directory} does not match its config "
                              f"(missing {missing[:2]}, unexpected {unexpected[:2]}); re-train or re-download it")
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise DatencoderError(
                f"encoder {directory}: {KIND}.json's config gives {name} the shape {list(tensor.shape)}, "
                f"{KIND}.safetensors holds {list(found[name].shape)} (config edited, e.g. encoder.rank?); "
                "re-train or re-download it")
