"""The training objective: diffusion loss of the adapted model plus the regularisers.

The model owns its loss (k-diffusion style): ``Objective`` returns a dict of *weighted* named
terms and loops simply sum it, so they never need to know which terms exist. The diffusion
target follows the scheduler's ``prediction_type`` (epsilon, v_prediction or sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import AdapterInputs, uses_dual_path
from .conditioning import (TextStates, added_cond_kwargs, encode_text, joint_unit, nearest_words, pooled_text,
                           word_embedding)
from .config import Config
from .diffusion import diffusion_target, min_snr_weights
from .regularizers import l2_loss, nn_contrastive_loss, norm_loss, offset_l2
from .tokens import fill_placeholder, hard_prompts, token_word

__all__ = ["Objective", "NoisyLatents", "diffusion_target", "min_snr_weights"]


@dataclass
class NoisyLatents:
    latents: Tensor  # [N, C, h, w] z_0
    noise: Tensor  # [N, C, h, w]
    timesteps: Tensor  # [N]
    noisy: Tensor  # [N, C, h, w] z_t


class Objective:
    """Diffusion loss + regularisers for a batch of (concept latents, prompts with S*)."""

    def __init__(self, base, cfg: Config, token_id: int, vocab_ids: Tensor, vocab_table: Tensor):
        self.base = base
        self.cfg = cfg
        self.token_id = token_id
        self.vocab_ids = vocab_ids
        self.vocab_table = vocab_table
        self.dims = base.token_dims  # S* has one vector per text encoder, concatenated
        # mean norm of real words, per text encoder
        self.target_norms = [float(t.norm(dim=-1).mean()) for t in vocab_table.split(list(self.dims), dim=-1)]
        self.target_norm = self.target_norms[0]
        self.anchor: Tensor | None = None
        if cfg.loss.l2_weight > 0:
            self.anchor = word_embedding(base, cfg.loss.l2_anchor or "object")

    # -- noise ----------------------------------------------------------------------------
    def add_noise(self, latents: Tensor, generator: torch.Generator | None = None,
                  timesteps: Tensor | None = None) -> NoisyLatents:
        n = latents.shape[0]
        sched = self.base.scheduler
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator)
        timesteps = timesteps.to(latents.device).long()
        return NoisyLatents(latents, noise, timesteps, sched.add_noise(latents, noise, timesteps))

    # -- prompts --------------------------------------------------------------------------
    def nearest(self, embedding: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Rows of the vocabulary table nearest each embedding: ([N, k], [N, k] cosines).

        ``conditioning.nearest_words``: with two text encoders (SDXL) by the mean of the
        per-encoder cosines.
        """
        return nearest_words(embedding, self.vocab_table, self.dims, k)

    def word(self, row: int) -> str:
        """The text of vocabulary table row ``row``."""
        return token_word(self.base.tokenizer, self.vocab_ids[row])

    def hard_words(self, embedding: Tensor) -> list[str]:
        """The nearest real word of each embedding row (no gradient): N embeddings -> N words."""
        return [self.word(i) for i in self.nearest(embedding)[0][:, 0].tolist()]

    def soft_text(self, prompts: list[str], embedding: Tensor) -> TextStates:
        placeholder, token = self.cfg.model.placeholder, self.cfg.model.token
        return encode_text(self.base, [fill_placeholder(p, placeholder, token) for p in prompts], token, embedding)

    @torch.no_grad()
    def hard_text(self, prompts: list[str], words: list[str]) -> TextStates:
        """States of the hard prompts, one row per prompt: prompt i takes word ``i % N``
        (``tokens.hard_prompts``)."""
        return encode_text(self.base, hard_prompts(prompts, self.cfg.model.placeholder, words))

    def hard_states(self, prompts: list[str], words: list[str]) -> Tensor:
        """[B, L, D] cross-attention states of the hard prompts (``hard_text``)."""
        return self.hard_text(prompts, words).states

    def adapter_inputs(self, factors, hard: Tensor | None) -> AdapterInputs:
        dp = self.cfg.dual_path
        return AdapterInputs(factors=factors, hard_states=hard, blend_self=dp.blend_self,
                             blend_cross=dp.blend_cross, scale=self.cfg.encoder.lora_scale)

    # -- prediction and loss --------------------------------------------------------------
    def predict(self, batch: NoisyLatents, prompts: list[str], embedding: Tensor,
                factors: dict[str, tuple[Tensor, Tensor]], dual_path: bool) -> Tensor:
        """The adapted UNet's prediction for B prompts and N embeddings/factors (B a multiple of N).

        SDXL: the pooled vector joining the time embedding, which both paths share, is chosen by
        ``dual_path.pooled`` (``conditioning.pooled_text``; the dual path is per attention layer).
        """
        dp = self.cfg.dual_path
        soft = self.soft_text(prompts, embedding)
        hard = None
        if dual_path and uses_dual_path(dp.blend_self, dp.blend_cross):
            hard = self.hard_text(prompts, self.hard_words(embedding))
        pooled = pooled_text(soft.pooled, hard.pooled if hard is not None else None, dp.pooled, dp.blend_cross)
        unet = self.base.unet
        adapter = self.adapter_inputs(factors, hard.states if hard is not None else None)
        return unet(batch.noisy.to(unet.dtype), batch.timesteps, soft.states.to(unet.dtype),
                    cross_attention_kwargs={"adapter": adapter},
                    added_cond_kwargs=added_cond_kwargs(self.base, TextStates(soft.states, pooled))).sample

    def __call__(self, batch: NoisyLatents, prompts: list[str], embedding: Tensor,
                 factors: dict[str, tuple[Tensor, Tensor]], dual_path: bool,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        loss_cfg = self.cfg.loss
        pred = self.predict(batch, prompts, embedding, factors, dual_path)
        target = diffusion_target(self.base.scheduler, batch.latents, batch.noise, batch.timesteps)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [N]
        terms = {"diffusion": (mse * self._snr_weights(batch.timesteps)).mean()}
        if loss_cfg.contrastive_weight > 0:
            terms["contrastive"] = loss_cfg.contrastive_weight * nn_contrastive_loss(
                joint_unit(embedding.float(), self.dims), joint_unit(self.vocab_table.to(embedding.device), self.dims),
                loss_cfg.tau, loss_cfg.num_negatives, loss_cfg.top_k_positives, generator,
                loss_cfg.predicted_negatives, loss_cfg.distinct_positives)
        if loss_cfg.norm_weight > 0:
            parts = embedding.float().split(list(self.dims), dim=-1)
            terms["norm"] = loss_cfg.norm_weight * sum(
                norm_loss(v, target) for v, target in zip(parts, self.target_norms)) / len(parts)
        if loss_cfg.l2_weight > 0 and self.anchor is not None:
            terms["l2"] = loss_cfg.l2_weight * l2_loss(embedding.float(), self.anchor)
        if loss_cfg.lora_weight > 0:
            terms["offsets"] = loss_cfg.lora_weight * offset_l2(factors)
        return terms

    def _snr_weights(self, timesteps: Tensor) -> Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023); ones when ``loss.snr_gamma`` is unset."""
        gamma = self.cfg.loss.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        return min_snr_weights(self.base.scheduler, timesteps, gamma)
