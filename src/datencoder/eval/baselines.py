"""Baselines of METHOD.md ("Baselines and ablations") on the same machinery as the method.

Each baseline maps (base model, one image) -> ``Concept``: the same ``Objective`` (diffusion loss
of the scheduler's own target on augmented copies of the image), the same step loop
(``tuning.optimise_on_image``, which ``personalize`` runs), the same concept artifact, so
``ConceptPipeline`` generates and ``export`` exports every method identically.

- Textual Inversion (Gal et al. 2022): only the embedding of S* is optimised, from a word's
  embedding (or the vocabulary mean), single path, no offsets, Adam.
- DreamBooth-LoRA (Ruiz et al. 2023, LoRA variant): only LoRA factors on the UNet attention
  projections (peft, added with diffusers' ``unet.add_adapter``) are optimised; S* is a fixed rare
  real token followed by a class word ("a photo of xu emoji"). The trained peft weights are read
  back into the concept's factor layout ``{"<attn module>.<target>": (A [r, in], B [out, r])}``
  with scale ``lora_alpha / r``, which is exactly peft's forward.
- DreamBooth, whole UNet (Ruiz et al. 2023 without the prior-preservation term): every UNet weight
  of a copy of the UNet is optimised, S* spelled as in DreamBooth-LoRA. Its result is not a
  concept artifact (a whole UNet is not an offset of the attention layers): ``dreambooth_unet``
  returns the concept (the rare word) and the base to generate with, whose UNet is the tuned copy.
  It is the evaluation's upper bound of what the base can draw, not an export path.

The E4T-style single-domain encoder and the ablations of our encoder are configurations of
``EncoderSystem`` + ``tuning.personalize`` (see ``configs/eval_minisd.yaml``), not code here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attention import target_layer_shapes
from ..base import BaseModel
from ..concept import Concept
from ..conditioning import text_vocabulary, word_embedding
from ..config import Config, DataConfig, check_range, check_seed, from_dict, to_dict
from ..errors import DatencoderError
from ..objective import Objective
from ..prepare import prepare_base
from ..cost import Cost, cost_info, measure
from ..tuning import StepCallback, optimise_on_image

__all__ = ["TextualInversionConfig", "DreamBoothLoRAConfig", "DreamBoothConfig", "OptimisationRun",
           "MasterWeightsAdam", "textual_inversion", "dreambooth_lora", "dreambooth_unet", "add_peft_lora",
           "peft_factors"]

log = logging.getLogger(__name__)


def _check_optimisation(cfg, section: str) -> None:
    """The settings both baselines share: a step count, Adam's rate, a batch of augmented views."""
    check_range(cfg, section, ">= 0", "steps")
    check_range(cfg, section, ">= 1", "batch_size")
    check_range(cfg, section, "> 0", "lr")
    check_range(cfg, section, "in (0, 1]", "scale_min")
    check_seed(cfg.seed, f"{section}.seed")
    if not cfg.templates:
        raise DatencoderError(f"{section}.templates must hold at least one prompt template")


@dataclass
class TextualInversionConfig:
    steps: int = 500
    lr: float = 5e-3
    batch_size: int = 4
    init_word: str | None = "emoji"
    """Initial embedding: this word's if it is one token, else (or None) the vocabulary mean."""
    templates: list[str] = field(default_factory=lambda: list(DataConfig().templates))
    hflip: bool = True
    scale_min: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_optimisation(self, "textual_inversion")


@dataclass
class DreamBoothLoRAConfig:
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 4
    rank: int = 4
    alpha: float | None = None
    """peft's lora_alpha; None = rank (offset scale 1)."""
    rare_word: str = "sks"
    """A real, rarely used single token that S* stands for (``sks`` suits CLIP; MiniLM: ``xu``)."""
    class_word: str = "emoji"
    """Written after S* in training and generation prompts ("a photo of S* emoji"); "" for none."""
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    attention_kinds: list[str] = field(default_factory=lambda: ["self", "cross"])
    templates: list[str] = field(default_factory=lambda: list(DataConfig().templates))
    hflip: bool = True
    scale_min: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_optimisation(self, "dreambooth_lora")
        check_range(self, "dreambooth_lora", ">= 1", "rank")
        check_range(self, "dreambooth_lora", "> 0", "alpha")
        if not self.rare_word.strip():
            raise DatencoderError("dreambooth_lora.rare_word must not be empty")
        bad = [t for t in self.targets if t not in ("to_q", "to_k", "to_v", "to_out.0")]
        if bad or not self.targets:
            raise DatencoderError(f"dreambooth_lora.targets may hold to_q, to_k, to_v, to_out.0, got {self.targets}")
        bad = [k for k in self.attention_kinds if k not in ("self", "cross")]
        if bad or not self.attention_kinds:
            raise DatencoderError(f"dreambooth_lora.attention_kinds may hold 'self' and 'cross', "
                                  f"got {self.attention_kinds}")


@dataclass
class DreamBoothConfig:
    """DreamBooth with the whole UNet trainable (no LoRA, no prior preservation, text encoder frozen)."""

    steps: int = 400
    lr: float = 2e-5
    batch_size: int = 4
    rare_word: str = "sks"
    """A real, rarely used single token that S* stands for (``sks`` suits CLIP; MiniLM: ``xu``)."""
    class_word: str = "emoji"
    templates: list[str] = field(default_factory=lambda: list(DataConfig().templates))
    hflip: bool = True
    scale_min: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_optimisation(self, "dreambooth")
        if not self.rare_word.strip():
            raise DatencoderError("dreambooth.rare_word must not be empty")


@dataclass
class OptimisationRun:
    """A baseline's optimisation so far, which a longer run of the same settings continues.

    Pass the same (initially empty) object to successive calls with growing ``steps`` and
    otherwise identical settings: each call resumes the optimiser, the parameters and the random
    generator where the last one stopped, so ``steps=500`` after ``steps=100`` gives exactly the
    concept of a straight 500-step run, for the cost of 400 more steps. ``cost`` (seconds and
    peak memory) covers the whole run so far, which is what a straight run would have cost.
    """

    steps: int = 0
    cost: Cost = field(default_factory=Cost)
    """``cost.measure`` of the run's setup and steps, summed (seconds) and maximised (peak) over calls."""
    settings: dict | None = None
    state: dict = field(default_factory=dict)

    def usable_for(self, settings: dict, steps: int) -> bool:
        return self.settings == settings and self.steps <= steps and bool(self.state)

    def reset(self, settings: dict) -> None:
        self.steps, self.cost, self.settings, self.state = 0, Cost(), settings, {}

    @property
    def seconds(self) -> float:
        return self.cost.seconds

    @property
    def peak_mb(self) -> float:
        return self.cost.peak_mb

    def add(self, phase: Cost) -> None:
        self.cost = Cost(self.cost.seconds + phase.seconds, max(self.cost.peak_mb, phase.peak_mb), phase.peak_of)


class MasterWeightsAdam:
    """Adam with fp32 master weights for parameters held in half precision (mixed-precision
    training): the model computes in its own dtype; each step moves its gradients to fp32 copies,
    steps those (fp32 Adam state) and writes them back rounded, so updates smaller than the half
    precision's resolution accumulate instead of vanishing. fp32 parameters are stepped in place."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.inner = torch.optim.Adam(self.masters, lr=lr)

    @property
    def param_groups(self) -> list[dict]:
        """The tensors Adam steps: the fp32 masters."""
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        copies = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        for p, m in copies:
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in copies:
            p.copy_(m)


def _settings(method_cfg) -> dict:
    return {k: v for k, v in to_dict(method_cfg).items() if k != "steps"}


def _objective_config(base: BaseModel, templates, hflip, scale_min, seed) -> Config:
    """The method's Config with every regulariser and the dual path off: plain diffusion loss."""
    return from_dict(Config, {
        "model": {"pretrained": base.name},
        "dual_path": {"enabled": False},
        "loss": {"contrastive_weight": 0.0, "norm_weight": 0.0, "l2_weight": 0.0, "lora_weight": 0.0},
        "data": {"templates": list(templates), "hflip": hflip, "scale_min": scale_min},
        "tune": {"seed": seed},
    })


@contextmanager
def _measured(run: OptimisationRun, device) -> Iterator[None]:
    """Add the block's ``cost.measure`` to the run's cost."""
    with measure(device) as phase:
        yield
    run.add(phase)


def _advance(run: OptimisationRun, steps: int, base: BaseModel, pixels: Tensor, batch_size: int,
             data: DataConfig, callback: StepCallback | None) -> None:
    """Optimise from ``run.steps`` to ``steps`` (single path: the embedding in ``run.state``, the
    trained tensors in its optimizer), measured into the run's cost."""
    st = run.state
    with _measured(run, base.device):
        optimise_on_image(st["objective"], base, pixels, range(run.steps, steps), batch_size, data,
                          lambda: (st["embedding"], {}), False, st["optimizer"], st["generator"], callback)
    run.steps = steps


def _single_token(base: BaseModel, word: str) -> int | None:
    ids = base.tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _concept(base: BaseModel, cfg: Config, embedding: Tensor, factors, hard_word: str, scale: float,
             method: str, method_cfg, run: OptimisationRun, info: dict | None) -> Concept:
    return Concept(
        embedding=embedding.detach().reshape(-1).clone(), factors=factors, hard_word=hard_word,
        placeholder=cfg.model.placeholder, token=cfg.model.token, blend_self=1.0, blend_cross=1.0,
        scale=scale, base={"name": base.name, "fingerprint": base.fingerprint},
        config={**to_dict(cfg), "baseline": {"method": method, **to_dict(method_cfg)}},
        info={**(info or {}), "method": method, "steps": method_cfg.steps, **cost_info(None, run.cost)},
        token_dims=base.token_dims,
    )


def textual_inversion(base: BaseModel, pixels: Tensor, tcfg: TextualInversionConfig | None = None,
                      callback: StepCallback | None = None, info: dict | None = None,
                      run: OptimisationRun | None = None) -> Concept:
    """pixels: [3, H, W] in [-1, 1] -> a concept with an optimised embedding and no factors.

    ``run``: continue that optimisation if it has the same settings and no more steps (see
    ``OptimisationRun``); it is updated in place.
    """
    tcfg = tcfg or TextualInversionConfig()
    run = run if run is not None else OptimisationRun()
    settings = _settings(tcfg)
    if not run.usable_for(settings, tcfg.steps):
        run.reset(settings)
        cfg = _objective_config(base, tcfg.templates, tcfg.hflip, tcfg.scale_min, tcfg.seed)
        vocab_ids, vocab_table = text_vocabulary(base, cfg.loss.whole_words_only)
        token_id = prepare_base(base, cfg.model.token).token_id
        objective = Objective(base, cfg, token_id, vocab_ids, vocab_table)
        with _measured(run, base.device):  # the vocabulary table is cached per base: not the method's cost
            init_id = _single_token(base, tcfg.init_word) if tcfg.init_word else None
            if init_id is None:
                log.debug("init word %r is not one token: starting from the vocabulary mean", tcfg.init_word)
            init = vocab_table.mean(0) if init_id is None else word_embedding(base, tcfg.init_word)
            embedding = init.clone().unsqueeze(0).requires_grad_()  # [1, D]
            run.state = {"cfg": cfg, "objective": objective, "embedding": embedding,
                         "optimizer": torch.optim.Adam([embedding], lr=tcfg.lr),
                         "generator": torch.Generator().manual_seed(tcfg.seed)}
    st = run.state
    _advance(run, tcfg.steps, base, pixels, tcfg.batch_size, st["cfg"].data, callback)
    hard_word = st["objective"].hard_words(st["embedding"].detach())[0]
    return _concept(base, st["cfg"], st["embedding"], {}, hard_word, 1.0, "textual_inversion", tcfg, run, info)


# -- DreamBooth-LoRA ------------------------------------------------------------------------------


def add_peft_lora(unet, keys: list[str], rank: int, alpha: float, adapter_name: str = "dreambooth"):
    """A copy of ``unet`` with a peft LoRA on the projections ``keys`` (B = 0: the identity)."""
    from peft import LoraConfig

    unet = copy.deepcopy(unet)  # the shared base UNet is never modified
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=keys, lora_dropout=0.0,
                                init_lora_weights=True, bias="none"), adapter_name)
    return unet


def peft_factors(unet, keys: list[str], adapter_name: str = "dreambooth") -> tuple[dict, float]:
    """peft's LoRA weights as concept factors {key: (A [r, in], B [out, r])} and their scale.

    peft computes ``x W^T + scaling * (x A^T) B^T`` with ``scaling = lora_alpha / r``; the concept's
    offset is ``scale * B @ A`` (``lora.delta_weight``), so the factors are copied unchanged and the
    scale is peft's scaling, which must be the same for every layer.
    """
    factors, scales = {}, set()
    for key in keys:
        layer = unet.get_submodule(key)
        if not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
            raise DatencoderError(f"UNet layer {key} has no LoRA adapter {adapter_name!r}; add it with add_peft_lora")
        A = layer.lora_A[adapter_name].weight.detach().float().clone()  # [r, in]
        B = layer.lora_B[adapter_name].weight.detach().float().clone()  # [out, r]
        factors[key] = (A, B)
        scales.add(float(layer.scaling[adapter_name]))
    if len(scales) != 1:
        raise DatencoderError(f"LoRA layers have different scalings {sorted(scales)}; use one rank and alpha")
    return factors, scales.pop()


def _dreambooth_prompts(base: BaseModel, dcfg) -> tuple[Config, str, list[str]]:
    """Both DreamBooth variants: (objective config, S* as spelled in prompts, training templates).

    S* is the fixed rare word followed by the class word ("xu emoji"); the rare word must be one token.
    """
    if _single_token(base, dcfg.rare_word) is None:
        raise DatencoderError(f"DreamBooth rare word {dcfg.rare_word!r} is not a single token of this "
                              f"tokenizer; set rare_word to one (e.g. 'sks' for CLIP, 'xu' for MiniLM)")
    cfg = _objective_config(base, dcfg.templates, dcfg.hflip, dcfg.scale_min, dcfg.seed)
    placeholder = cfg.model.placeholder
    spelled = f"{placeholder} {dcfg.class_word}".strip()
    return cfg, spelled, [t.replace(placeholder, spelled) for t in dcfg.templates]


def dreambooth_lora(base: BaseModel, pixels: Tensor, dcfg: DreamBoothLoRAConfig | None = None,
                    callback: StepCallback | None = None, info: dict | None = None,
                    run: OptimisationRun | None = None) -> Concept:
    """pixels: [3, H, W] in [-1, 1] -> a concept whose S* is a fixed rare token, with LoRA factors.

    ``run``: continue that optimisation if it has the same settings and no more steps (see
    ``OptimisationRun``); it is updated in place.
    """
    dcfg = dcfg or DreamBoothLoRAConfig()
    run = run if run is not None else OptimisationRun()
    settings = _settings(dcfg)
    cfg, spelled, templates = _dreambooth_prompts(base, dcfg)
    if not run.usable_for(settings, dcfg.steps):
        run.reset(settings)
        vocab_ids, vocab_table = text_vocabulary(base, cfg.loss.whole_words_only)
        placeholder_id = prepare_base(base, cfg.model.token).token_id
        with _measured(run, base.device):
            keys = sorted(target_layer_shapes(base.unet, dcfg.targets, dcfg.attention_kinds))
            alpha = float(dcfg.alpha if dcfg.alpha is not None else dcfg.rank)
            with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: seed it
                torch.manual_seed(dcfg.seed)
                peft_unet = add_peft_lora(base.unet, keys, dcfg.rank, alpha)
            lora_params = [p for n, p in peft_unet.named_parameters() if "lora_" in n]
            for p in lora_params:
                # trained in fp32 whatever the base's dtype: peft casts the layer input to the
                # adapter's dtype and the adapter's output back
                p.data = p.data.float()
                p.requires_grad_(True)
            # The same Objective, on a base whose UNet is the peft copy; S* embeds as the rare word.
            peft_base = dataclasses.replace(base, unet=peft_unet)
            objective = Objective(peft_base, cfg, placeholder_id, vocab_ids, vocab_table)
            embedding = word_embedding(base, dcfg.rare_word).unsqueeze(0)  # [1, sum(token_dims)]: the rare token
            run.state = {"keys": keys, "peft_unet": peft_unet, "peft_base": peft_base, "objective": objective,
                         "embedding": embedding, "optimizer": torch.optim.Adam(lora_params, lr=dcfg.lr),
                         "generator": torch.Generator().manual_seed(dcfg.seed)}
    st = run.state
    _advance(run, dcfg.steps, st["peft_base"], pixels, dcfg.batch_size,
             dataclasses.replace(cfg.data, templates=templates), callback)
    factors, scale = peft_factors(st["peft_unet"], st["keys"])
    info = {**(info or {}), "prompt_placeholder": spelled}
    return _concept(base, cfg, st["embedding"], factors, dcfg.rare_word, scale, "dreambooth_lora", dcfg, run, info)


# -- DreamBooth, whole UNet --------------------------------------------------------------------------


def dreambooth_unet(base: BaseModel, pixels: Tensor, dcfg: DreamBoothConfig | None = None,
                    callback: StepCallback | None = None, info: dict | None = None,
                    run: OptimisationRun | None = None) -> tuple[Concept, BaseModel]:
    """pixels: [3, H, W] in [-1, 1] -> (concept: S* is a fixed rare token, no factors; the base to
    generate with: ``base`` with a tuned copy of its UNet). ``base`` itself is not modified.

    ``run``: continue that optimisation if it has the same settings and no more steps (see
    ``OptimisationRun``); it is updated in place.
    """
    dcfg = dcfg or DreamBoothConfig()
    run = run if run is not None else OptimisationRun()
    settings = _settings(dcfg)
    cfg, spelled, templates = _dreambooth_prompts(base, dcfg)
    if not run.usable_for(settings, dcfg.steps):
        run.reset(settings)
        vocab_ids, vocab_table = text_vocabulary(base, cfg.loss.whole_words_only)
        placeholder_id = prepare_base(base, cfg.model.token).token_id
        with _measured(run, base.device):
            unet = copy.deepcopy(base.unet)  # the shared base UNet is never modified
            params = [p for p in unet.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            tuned_base = dataclasses.replace(base, unet=unet)
            objective = Objective(tuned_base, cfg, placeholder_id, vocab_ids, vocab_table)
            embedding = word_embedding(base, dcfg.rare_word).unsqueeze(0)  # [1, sum(token_dims)]
            run.state = {"tuned_base": tuned_base, "objective": objective, "embedding": embedding,
                         "optimizer": MasterWeightsAdam(params, lr=dcfg.lr),
                         "generator": torch.Generator().manual_seed(dcfg.seed)}
    st = run.state
    _advance(run, dcfg.steps, st["tuned_base"], pixels, dcfg.batch_size,
             dataclasses.replace(cfg.data, templates=templates), callback)
    info = {**(info or {}), "prompt_placeholder": spelled}
    concept = _concept(base, cfg, st["embedding"], {}, dcfg.rare_word, 1.0, "dreambooth", dcfg, run, info)
    return concept, st["tuned_base"]
