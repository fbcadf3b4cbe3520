"""Two auxiliary stages of minisd-emoji, run as ``datencoder minisd {tower,evaluator} CONFIG``.

* ``tower``: the image tower of minisd-emoji, a small CLIPVisionModel trained contrastively
  against frozen MiniLM sentence embeddings of train-split captions; exported next to the VAE
  and UNet in assets/minisd-emoji/image_tower.
* ``evaluator``: the measuring CNN (concept, style, background, position, size, identity
  embedding), trained on every concept and style from fresh compositions of the clean sources;
  composition index ``val_index`` of every (concept, style) is never trained on and is its
  validation set. Exported to assets/evaluator.

Both train on the one loop of ``datencoder.training`` (bf16, EMA, time budget, resumable checkpoints) and
export the EMA weights when training stops, then write their measured accuracy to the work dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from ...config import to_dict
from ...errors import DatencoderError
from ...io import ASSETS, save_file_atomic, to_pixels, to_uint8, write_json_atomic
from ...training import load_ema_weights
from ..batches import (AugmentConfig, SourceBank, augment, composition_index, load_rows_uint8, read_concepts,
                       read_rows)
from ..data import STYLE_WORDS, STYLES
from ..evaluator import HEADS, EvaluatorArch, EvaluatorNet, evaluator_folder, save_evaluator
from ..tower import ContrastiveTower, TowerArch, clip_loss, retrieval_accuracy, save_tower, sentence_embeddings
from .config import MiniTrainConfig
from .data import load_text_encoder
from .stages import _shipped, train_stage

__all__ = ["TowerStageConfig", "EvaluatorStageConfig", "run_tower", "run_evaluator", "full_caption"]

logger = logging.getLogger(__name__)


@dataclass
class TowerDataConfig:
    root: str = "data/emoji"
    eval_rows: int = 512
    """Train-split rows kept out of training, for caption->image retrieval."""
    eval_batch: int = 256
    """Retrieval is scored among this many images at a time."""


@dataclass
class TowerStageConfig:
    model: TowerArch = field(default_factory=TowerArch)
    data: TowerDataConfig = field(default_factory=TowerDataConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_prob=0.1, noise_std=0.02))
    train: MiniTrainConfig = field(default_factory=lambda: MiniTrainConfig(work_dir="runs/minisd/tower", threads=1))
    init_temperature: float = 0.07
    export_dir: str = ""
    """Empty: the package's assets/minisd-emoji/image_tower."""


@dataclass
class EvaluatorDataConfig:
    root: str = "data/emoji"
    val_index: int = 3
    """Composition index of every (concept, style) held out as the evaluator's validation set."""


@dataclass
class EvaluatorStageConfig:
    model: EvaluatorArch = field(default_factory=EvaluatorArch)
    data: EvaluatorDataConfig = field(default_factory=EvaluatorDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: MiniTrainConfig = field(default_factory=lambda: MiniTrainConfig(work_dir="runs/minisd/evaluator", threads=1))
    head_weights: dict[str, float] = field(default_factory=lambda: {h: 1.0 for h in HEADS})
    label_smoothing: float = 0.1
    imprint_compositions: int = 3
    """Compositions per render averaged into its concept prototype (sizes cycle, the rest random)."""
    imprint_vae: str = "minisd-emoji"
    """VAE folder ('minisd-emoji': the embedded default's) whose reconstruction of one composition
    per render becomes a second set of prototypes, so decoded (generated) images are recognised;
    empty: none."""
    export_dir: str = ""
    """Empty: the package's assets/evaluator."""
    world: str = ""
    """A world file (``datencoder data world``): train and classify only its concepts (all styles);
    empty: every concept of the data set."""
    vae_prob: float = 0.0
    """Chance that a training composition is passed through ``imprint_vae`` (encode, decode) first,
    so the embedding learns to read what a decoder gives back."""
    init_from: str = ""
    """An evaluator folder ('evaluator': the shipped one) whose trunk weights start this run
    (heads whose class count differs start fresh)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.vae_prob <= 1.0:
            raise DatencoderError(f"vae_prob must be in [0, 1], got {self.vae_prob}")
        if self.vae_prob > 0 and not self.imprint_vae:
            raise DatencoderError("vae_prob > 0 needs imprint_vae (the VAE whose round trip is trained on)")


def full_caption(row: dict) -> str:
    """Every attribute of a composed example, in the data set's caption wording."""
    bg = row["background"]
    article = "an" if bg[0] in "aeiou" else "a"
    return f"{row['name']}, {STYLE_WORDS[row['style']]} style, {row['size']}, {row['position']}, on {article} {bg} background"


def _text_embeddings(captions: list[str], cache: Path) -> torch.Tensor:
    """Frozen MiniLM sentence embeddings, cached in the work dir (keyed by the caption list)."""
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("digest") == digest:
                return f.get_tensor("embeddings")
    tokenizer, encoder = load_text_encoder(128)  # captions are ~20 tokens; nothing is cut
    logger.info("embedding %d captions with MiniLM", len(captions))
    emb = sentence_embeddings(captions, encoder, tokenizer)
    save_file_atomic(cache, {"embeddings": emb}, {"digest": digest})
    return emb


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] (the stored layout) -> [-1, 1] through the one pixel pair."""
    return to_pixels(images.movedim(-3, -1))


@torch.no_grad()
def _retrieval(model: ContrastiveTower, images: torch.Tensor, text: torch.Tensor, batch: int) -> dict:
    """Mean caption->image top-1/top-5 over consecutive batches of ``batch`` pairs."""
    model.eval()
    scores = []
    for start in range(0, len(images) - batch + 1, batch):
        img = model(_to_float(images[start : start + batch]))
        scores.append(retrieval_accuracy(img, text[start : start + batch]))
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} | {"batch": batch, "pairs": batch * len(scores)}


def run_tower(cfg: TowerStageConfig, resume: bool) -> int:
    torch.set_num_threads(cfg.train.threads)
    root = cfg.data.root
    rows = read_rows(root, ["train"])
    gen = torch.Generator().manual_seed(cfg.train.seed)
    perm = torch.randperm(len(rows), generator=gen).tolist()
    eval_rows = [rows[i] for i in perm[: cfg.data.eval_rows]]
    train_rows = [rows[i] for i in perm[cfg.data.eval_rows :]]
    heldout = read_rows(root, ["heldout_concept"])
    heldout = [heldout[i] for i in torch.randperm(len(heldout), generator=gen)[: cfg.data.eval_rows].tolist()]
    groups = {"train": train_rows, "eval_train_style": eval_rows, "eval_heldout_concept": heldout}
    captions = [full_caption(r) for g in groups.values() for r in g]
    work = Path(cfg.train.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    text = _text_embeddings(captions, work / "text.safetensors")
    images = load_rows_uint8(root, [r for g in groups.values() for r in g], cfg.model.image_size)
    torch.set_num_threads(cfg.train.threads)
    n_train, n_eval = len(train_rows), len(eval_rows)
    model = ContrastiveTower(cfg.model, text.shape[1], cfg.init_temperature)
    logger.info("tower: %.2fM parameters, %d training pairs", sum(p.numel() for p in model.parameters()) / 1e6, n_train)

    def loss_fn(m, idx, g):
        with torch.autocast("cpu", enabled=False):
            x = augment(_to_float(images[idx]), cfg.augment, g)
        emb = m(x)
        loss = clip_loss(emb.float(), text[idx], m.logit_scale)
        return {"loss": loss, "temperature": 1.0 / m.logit_scale.detach().exp()}

    result = train_stage(model, loss_fn, n_train, cfg.train, resume, meta={"config": to_dict(cfg)})
    ema = _ema_model(model, work)
    metrics = {
        "step": result.step,
        "train_minutes": result.train_seconds / 60,
        "temperature": float(1.0 / ema.logit_scale.exp()),
        "train_style_heldout_rows": _retrieval(ema, images[n_train : n_train + n_eval], text[n_train : n_train + n_eval], cfg.data.eval_batch),
        "heldout_concept": _retrieval(ema, images[n_train + n_eval :], text[n_train + n_eval :], cfg.data.eval_batch),
    }
    out = Path(cfg.export_dir) if cfg.export_dir else ASSETS / "minisd-emoji" / "image_tower"
    save_tower(ema.vision, out, [0.5] * 3, [0.5] * 3)
    # The projection into MiniLM space is shipped too: it lets image features be compared with
    # sentence embeddings (an image-text score for the minisd-emoji world).
    save_file_atomic(out / "projection.safetensors", {"weight": ema.proj.weight.detach().half()})
    write_json_atomic(out / "datencoder_tower.json", {"config": to_dict(cfg), "metrics": metrics})
    write_json_atomic(work / "metrics.json", metrics)
    logger.info("tower retrieval: %s", json.dumps(metrics))
    return 0


def _ema_model(model: torch.nn.Module, work: Path) -> torch.nn.Module:
    """The model carrying the EMA weights of the stage's checkpoint, in eval mode, fp32."""
    model.load_state_dict(load_ema_weights(work), strict=False)
    return model.eval()


def _labels_of(rows: list[dict], index: dict[str, dict[str, int]]) -> dict[str, torch.Tensor]:
    return {h: torch.tensor([index[h][r[h]] for r in rows]) for h in HEADS}


@torch.no_grad()
def evaluate_heads(net: EvaluatorNet, images: torch.Tensor, labels: dict[str, torch.Tensor],
                   batch: int = 512) -> dict[str, float]:
    """Top-1 accuracy per head and concept top-5 on uint8 images."""
    net.eval()
    logits = {h: [] for h in HEADS}
    for start in range(0, len(images), batch):
        out, _ = net(_to_float(images[start : start + batch]))
        for h in HEADS:
            logits[h].append(out[h])
    logits = {h: torch.cat(v) for h, v in logits.items()}
    acc = {h: float((logits[h].argmax(-1) == labels[h]).float().mean()) for h in HEADS}
    top5 = logits["concept"].topk(5, dim=-1).indices
    acc["concept_top5"] = float((top5 == labels["concept"][:, None]).any(-1).float().mean())
    return acc


def run_evaluator(cfg: EvaluatorStageConfig, resume: bool) -> int:
    torch.set_num_threads(cfg.train.threads)
    root = cfg.data.root
    rows = read_rows(root)
    concepts = read_concepts(root, rows)
    if cfg.world:
        from ..world import world_keys

        keep = set(world_keys(cfg.world))
        concepts = [c for c in concepts if c["key"] in keep]
        rows = [r for r in rows if r["concept"] in keep]
    work = Path(cfg.train.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bank = SourceBank(root, [(c["key"], s) for c in concepts for s in STYLES], work / "sources.safetensors")
    labels = {"concept": [c["key"] for c in concepts], "style": list(STYLES), "background": bank.backgrounds,
              "position": bank.positions, "size": bank.sizes}
    index = {h: {v: i for i, v in enumerate(vs)} for h, vs in labels.items()}
    source_of = {src: i for i, src in enumerate(bank.sources)}
    src_concept = torch.tensor([index["concept"][k] for k, _ in bank.sources])
    src_style = torch.tensor([index["style"][s] for _, s in bank.sources])
    # The validation composition of each source is never drawn for training (see module doc).
    val_rows = [r for r in rows if composition_index(r) == cfg.data.val_index]
    held = torch.full((len(bank), 3), -1, dtype=torch.long)
    for r in val_rows:
        held[source_of[(r["concept"], r["style"])]] = torch.tensor(
            [index["size"][r["size"]], index["position"][r["position"]], index["background"][r["background"]]])
    net = EvaluatorNet(cfg.model, {h: len(v) for h, v in labels.items()})
    if cfg.init_from and not resume:
        _init_trunk(net, cfg.init_from)
    vae = _imprint_vae(cfg.imprint_vae)
    logger.info("evaluator: %.2fM parameters, %d sources, %d validation images",
                sum(p.numel() for p in net.parameters()) / 1e6, len(bank), len(val_rows))

    def loss_fn(m, idx, g):
        with torch.autocast("cpu", enabled=False):
            y = {"size": torch.randint(len(bank.sizes), (len(idx),), generator=g),
                 "position": torch.randint(len(bank.positions), (len(idx),), generator=g),
                 "background": torch.randint(len(bank.backgrounds), (len(idx),), generator=g)}
            clash = (torch.stack([y["size"], y["position"], y["background"]], 1) == held[idx]).all(1)
            y["background"] = torch.where(clash, (y["background"] + 1) % len(bank.backgrounds), y["background"])
            x = bank.compose(idx, y["size"], y["position"], y["background"])
            if cfg.vae_prob > 0:
                x = _vae_some(x, vae, cfg.vae_prob, g)
            x = augment(x, cfg.augment, g)
        y["concept"], y["style"] = src_concept[idx], src_style[idx]
        logits, _ = m(x)
        terms = {h: F.cross_entropy(logits[h].float(), y[h], label_smoothing=cfg.label_smoothing) for h in HEADS}
        terms["loss"] = sum(cfg.head_weights.get(h, 1.0) * terms[h] for h in HEADS)
        return terms

    result = train_stage(net, loss_fn, len(bank), cfg.train, resume, meta={"config": to_dict(cfg)})
    ema = _ema_model(net, work)
    val_images = load_rows_uint8(root, val_rows, cfg.model.image_size)
    val_labels = _labels_of(val_rows, index)
    # Imprinted per-style prototypes usually beat the classifier trained for a few hundred steps:
    # a validation image is a new composition of a render the prototypes were built from.
    counts = {h: len(v) for h, v in labels.items()}
    protos = _imprint(ema, bank, src_concept, src_style, counts, cfg.imprint_compositions)
    if vae is not None:  # second view of every render: as the base model's VAE gives it back
        protos = torch.cat([protos, _imprint(ema, bank, src_concept, src_style, counts, 1, vae=vae)], dim=1)
    candidates = {"classifier": ema}
    for name, style in (("prototypes", False), ("prototypes+style", True)):
        net_p = EvaluatorNet(replace(cfg.model, prototypes_per_concept=protos.shape[1], prototype_style=style), counts)
        net_p.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "prototypes"}, strict=False)
        net_p.prototypes.copy_(protos)
        candidates[name] = net_p
    scores = {k: evaluate_heads(m, val_images, val_labels) for k, m in candidates.items()}
    metrics = {"step": result.step, "train_minutes": result.train_seconds / 60,
               "val_index": cfg.data.val_index,
               "heads_val": {k: {h: v[h] for h in ("concept", "style")} for k, v in scores.items()}}
    # Pick on concept accuracy, then style (one choice among three, made on the validation set).
    head = max(candidates, key=lambda k: (scores[k]["concept"], scores[k]["style"]))
    best = candidates[head]
    metrics["heads"] = head
    metrics["render_top1_val"] = render_top1(ema, protos, val_images, val_labels, len(STYLES))
    metrics["val_all"] = evaluate_heads(best, val_images, val_labels)
    for split in ("train", "heldout_concept", "heldout_style"):
        keep = torch.tensor([r["split"] == split for r in val_rows])
        metrics[f"val_{split}"] = evaluate_heads(best, val_images[keep], {h: v[keep] for h, v in val_labels.items()})
    if vae is not None:  # how the shipped heads read decoded images: 512 validation images
        pick = torch.randperm(len(val_rows), generator=torch.Generator().manual_seed(0))[:512]
        if cfg.world:  # a world's validation set is small: read all of it through the VAE
            pick = torch.arange(len(val_rows))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            rec = vae.decode(vae.encode(_to_float(val_images[pick])).latent_dist.mean).sample.float()
        rec = to_uint8(rec).movedim(-1, -3)  # channels first, like the stored images
        metrics["val_vae_reconstructed_512"] = evaluate_heads(best, rec, {h: v[pick] for h, v in val_labels.items()})
        metrics["render_top1_val_vae"] = render_top1(ema, protos, rec, {h: v[pick] for h, v in val_labels.items()},
                                                       len(STYLES))
    out = Path(cfg.export_dir) if cfg.export_dir else ASSETS / "evaluator"
    names = {c["key"]: c["name"] for c in concepts}
    save_evaluator(best, labels, out, names, {"config": to_dict(cfg), "metrics": metrics})
    write_json_atomic(work / "metrics.json", metrics)
    logger.info("evaluator validation: %s", json.dumps(metrics))
    return 0


@torch.no_grad()
def render_top1(net: EvaluatorNet, protos: torch.Tensor, images: torch.Tensor, labels: dict[str, torch.Tensor],
                s: int) -> float:
    """Instance-level identity: the share of images whose nearest render prototype is their own
    render (concept AND style: the same apple by another artist is another render).
    ``protos`` [C, V * S, D] holds V views (composite, VAE round trip) of each of the S styles' renders."""
    net.eval()
    c, vs, d = protos.shape
    hits = []
    for start in range(0, len(images), 512):
        emb = net(_to_float(images[start : start + 512]))[1]
        sims = (emb @ protos.reshape(c * vs, d).t()).view(len(emb), c, vs // s, s).amax(dim=2)  # [B, C, S]
        best = sims.flatten(1).argmax(dim=1)
        truth = labels["concept"][start : start + 512] * s + labels["style"][start : start + 512]
        hits.append(best == truth)
    return float(torch.cat(hits).float().mean()) if hits else 0.0


def _init_trunk(net: EvaluatorNet, folder: str) -> None:
    """Load the weights of an exported evaluator whose shapes match (the trunk; a head for another
    number of classes keeps its fresh init)."""
    from safetensors.torch import load_file

    path = evaluator_folder(folder)
    if not (path / "model.safetensors").exists():
        raise DatencoderError(f"init_from={folder}: no model.safetensors in {path}")
    own = net.state_dict()
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()
             if k in own and own[k].shape == v.shape}
    net.load_state_dict(state, strict=False)
    logger.info("evaluator initialised from %s (%d of %d tensors)", path, len(state), len(own))


@torch.no_grad()
def _vae_some(x: torch.Tensor, vae, prob: float, gen: torch.Generator) -> torch.Tensor:
    """x with a ``prob`` share of its images replaced by their VAE round trip (posterior mean)."""
    pick = (torch.rand(len(x), generator=gen) < prob).nonzero().flatten()
    if len(pick):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = vae.decode(vae.encode(x[pick]).latent_dist.mean).sample.float().clamp(-1, 1)
        x = x.clone()
        x[pick] = rec
    return x


def _imprint_vae(path: str):
    """The AutoencoderKL whose reconstructions get their own prototypes, or None."""
    if not path:
        return None
    folder = Path(_shipped(path, "vae"))
    if not (folder / "config.json").exists():
        logger.warning("no VAE at %s: prototypes of reconstructions skipped", folder)
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


@torch.no_grad()
def _imprint(net: EvaluatorNet, bank: SourceBank, src_concept: torch.Tensor, src_style: torch.Tensor,
             counts: dict[str, int], per_source: int, batch: int = 512, vae=None) -> torch.Tensor:
    """[concepts, styles, D]: mean embedding of ``per_source`` compositions of each render
    (passed through ``vae`` first when given: posterior mean, then decode)."""
    net.eval()
    gen = torch.Generator().manual_seed(1 if vae is not None else 0)
    protos = torch.zeros(counts["concept"], counts["style"], net.arch.embed_dim)
    for start in tqdm(range(0, len(bank), batch), desc="imprint", mininterval=10):
        idx = torch.arange(start, min(start + batch, len(bank)))
        acc = torch.zeros(len(idx), net.arch.embed_dim)
        for j in range(per_source):
            size = torch.full((len(idx),), (j + (vae is not None)) % len(bank.sizes))
            position = torch.randint(len(bank.positions), (len(idx),), generator=gen)
            background = torch.randint(len(bank.backgrounds), (len(idx),), generator=gen)
            x = bank.compose(idx, size, position, background)
            if vae is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    x = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
            acc += net(x)[1]
        protos[src_concept[idx], src_style[idx]] = F.normalize(acc, dim=-1)
    return protos
