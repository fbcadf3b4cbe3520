"""``datencoder pretrain CONFIG [key=value ...] [--resume] [--max-steps N]``: pre-train the encoder.

One code path for one CPU process and for ``accelerate launch`` on several GPUs: the frozen base
sits on ``accelerator.device``, only the encoder is prepared (DDP-wrapped), and each process reads
its own shard of one global data stream. The stream is a pure function of the seed: position k
is image ``perm(seed, epoch = k // N)[k % N]`` with augmentation and template drawn from a
generator seeded by (seed, k). The noise, timesteps and negatives come from one generator per
process whose state is checkpointed, so ``--resume`` continues bit-identically.

Output folder: ``log.jsonl`` (loss terms, and ``health_distinct_nearest`` / ``health_top_word_share``
of the window's predicted embeddings, so an encoder collapse shows while it happens), ``checkpoint/`` (encoder + AdamW + scheduler tensors in safetensors,
step/position/RNG states in JSON, swapped in atomically), ``samples/step_XXXXXX.png`` and the
final ``encoder/`` (``EncoderSystem.save``, with the resolved config).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..base import DEFAULT_BASE, load_base, resolve_device
from ..io import check_output, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from ..config import Config, TrainConfig, load_config, to_dict
from ..dataset import ImageFolderDataset
from ..errors import DatencoderError
from ..health import nearest_word_stats
from ..image_io import make_grid, save_image_atomic
from ..emoji.minisd.checkpoint import load_optimizer_tensors, optimizer_tensors
from ..pipeline import ConceptPipeline
from ..system import EncoderSystem
from ..tokens import nearest_tokens
from ..tuning import personalize

__all__ = ["add_arguments", "run", "train", "TrainResult", "lr_factor"]

log = logging.getLogger(__name__)

CKPT_KIND = "pretrain_checkpoint"


@dataclass
class TrainResult:
    step: int
    steps_this_run: int
    seconds_per_step: float
    final_loss: float
    output_dir: Path
    is_main: bool


def _mix(*parts) -> int:
    """A 63-bit seed from several values (distinct streams never share a seed)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then flat or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# -- data stream ------------------------------------------------------------------------------
class _Stream(torch.utils.data.Dataset):
    """Global stream position k -> one training item; a pure function of (seed, k)."""

    def __init__(self, dataset: ImageFolderDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, k: int):
        n = len(self.dataset)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, "order", epoch))))
        index = int(self._perm[1][k % n])
        return self.dataset.item(index, torch.Generator().manual_seed(_mix(self.seed, "item", k)))


class _ShardPositions(torch.utils.data.Sampler):
    """This process's stream positions, step after step, starting at global position ``start``."""

    def __init__(self, start: int, batch: int, accum: int, world: int, rank: int):
        self.start, self.batch, self.accum, self.world, self.rank = start, batch, accum, world, rank

    def __iter__(self):
        per_step = self.batch * self.accum * self.world
        step = 0
        while True:
            base = self.start + step * per_step
            for micro in range(self.accum):
                first = base + (micro * self.world + self.rank) * self.batch  # this rank's slice
                yield from range(first, first + self.batch)
            step += 1


# -- checkpoint -------------------------------------------------------------------------------
def _rank_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG state of this process: tensors (safetensors) and plain values (JSON)."""
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    version, py_state, gauss = random.getstate()
    plain = {"python": [version, list(py_state), gauss], "numpy": [np_state[0], *map(_plain, np_state[2:])]}
    return tensors, plain


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _set_rank_rng(generator: torch.Generator, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, py_state, gauss = plain["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _save_checkpoint(accelerator, out: Path, encoder, optimizer, scheduler, generator, scalars: dict) -> None:
    """All processes call this; the main one writes ``checkpoint/`` through a temp folder + rename."""
    from accelerate.utils import gather_object

    mine = _rank_rng(generator)
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    if accelerator.is_main_process:
        tensors = {f"encoder.{k}": v for k, v in accelerator.unwrap_model(encoder).state_dict().items()}
        opt, groups = optimizer_tensors(optimizer)
        tensors.update(opt)
        for rank, (rng, _) in enumerate(ranks):
            tensors.update({f"rng.{rank}.{k}": v for k, v in rng.items()})
        meta = {**scalars, "kind": CKPT_KIND, "num_processes": accelerator.num_processes,
                "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": [plain for _, plain in ranks]}
        final, tmp, old = out / "checkpoint", out / ".checkpoint.tmp", out / ".checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tensors_atomic(tmp / "checkpoint.safetensors", tensors, CKPT_KIND, {"step": str(scalars["step"])})
        write_json_atomic(tmp / "checkpoint.json", meta)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _checkpoint_dir(out: Path) -> Path | None:
    for name in ("checkpoint", ".checkpoint.old"):  # .old survives a crash between the two renames
        if (out / name / "checkpoint.json").is_file():
            return out / name
    return None


def _load_checkpoint(accelerator, directory: Path, cfg: Config, encoder, optimizer, scheduler,
                     generator) -> dict:
    meta = read_json(directory / "checkpoint.json", CKPT_KIND)
    tensors = load_tensors(directory / "checkpoint.safetensors", CKPT_KIND)
    saved_cfg, now = meta.get("config", {}), to_dict(cfg)
    changed = [k for k in now if k != "train" and saved_cfg.get(k) != now[k]]
    if changed:
        log.warning("resuming with changed config sections %s: the run is no longer exactly reproducible", changed)
    state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    accelerator.unwrap_model(encoder).load_state_dict(state)
    load_optimizer_tensors(optimizer, tensors, meta["optimizer_groups"])
    scheduler.load_state_dict(meta["scheduler"])
    if accelerator.scaler is not None and meta.get("scaler"):
        accelerator.scaler.load_state_dict(meta["scaler"])
    rank = accelerator.process_index
    if meta["num_processes"] != accelerator.num_processes:
        log.warning("checkpoint written by %d processes, resuming with %d: data order continues, "
                    "noise differs", meta["num_processes"], accelerator.num_processes)
    prefix = f"rng.{rank}."
    if rank < len(meta["rng"]):
        rng = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _set_rank_rng(generator, rng, meta["rng"][rank])
    return meta


# -- samples ----------------------------------------------------------------------------------
def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    array = ((pixels.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@torch.no_grad()
def _sample_grid(system: EncoderSystem, dataset: ImageFolderDataset, cfg: Config, path: Path) -> None:
    """Rows: fixed training images; columns: the image, then one generation per prompt."""
    n = min(cfg.train.sample_concepts, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    tune = dataclasses.replace(cfg.tune, steps=0)  # the encoder's own prediction, no tuning
    images, labels = [], []
    device = system.base.unet.device
    for index in indices:
        pixels = dataset.clean(index)
        concept = personalize(system, pixels.to(device), tune)
        pipe = ConceptPipeline(system.base, concept, cfg.sample.scheduler)
        images.append(_to_pil(pixels))
        labels.append(f"#{index} ~{concept.hard_word}")
        images += pipe(cfg.train.sample_prompts, num_images=1, num_inference_steps=cfg.sample.steps,
                       guidance_scale=cfg.sample.guidance, seed=cfg.sample.seed)
        labels += cfg.train.sample_prompts
    save_image_atomic(make_grid(images, cols=1 + len(cfg.train.sample_prompts), labels=labels), path)


# -- training ---------------------------------------------------------------------------------
def _trim_log(path: Path, step: int) -> None:
    """After a resume, drop log rows written after the checkpoint (they are re-run)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{r}\n" for r in rows))
        os.replace(tmp, path)


def _accelerator(tc: TrainConfig, cpu: bool = False):
    """The Accelerator, refusing a launch whose processes would each train alone.

    ``accelerate launch --multi_gpu --num_processes N`` without N GPUs starts N processes that each
    see one process (WORLD_SIZE=N, num_processes=1): N independent trainings writing one folder.
    """
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                                  cpu=cpu)
    except (ValueError, RuntimeError) as err:  # e.g. WORLD_SIZE set without MASTER_ADDR
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DatencoderError(f"could not start the distributed run ({line}); {_LAUNCH_HINT}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise DatencoderError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate runs each alone "
            f"(num_processes={accelerator.num_processes}, {accelerator.distributed_type.value}): they would train "
            f"independently into one output folder; {_LAUNCH_HINT}")
    return accelerator


_LAUNCH_HINT = ("on N GPUs use 'accelerate launch --multi_gpu --num_processes N', on CPUs "
                "'ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N' (docs/commands.md)")


def train(cfg: Config, resume: bool = False, max_steps: int | None = None,
          device: str | None = None) -> TrainResult:
    """Pre-train (or continue) the encoder described by ``cfg``; returns the run's summary.

    ``device`` "cpu" forces the CPU; otherwise accelerate places each process (CUDA when present).
    """
    from accelerate.utils import set_seed

    tc = cfg.train
    if not cfg.model.pretrained:
        raise DatencoderError("model.pretrained is empty; pass model.pretrained=FOLDER_OR_HUB_ID")
    small = [k for k in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every")
             if getattr(tc, k) < 1]
    if small:
        raise DatencoderError(f"train.{small[0]} must be >= 1, got {getattr(tc, small[0])}")
    out = Path(tc.output_dir)
    if not resume and _checkpoint_dir(out) is not None:
        raise DatencoderError(f"{out} already holds a checkpoint; pass --resume to continue it "
                              "or set train.output_dir to a new folder")
    ckpt_dir = _checkpoint_dir(out) if resume else None
    if resume and ckpt_dir is None:
        raise DatencoderError(f"no checkpoint in {out}/checkpoint; run without --resume first")
    check_output(out, "train.output_dir")
    for key in ("pretrained", "image_tower"):  # the saved encoder must not depend on the working directory
        value = getattr(cfg.model, key)
        if value and value != DEFAULT_BASE and Path(value).expanduser().is_dir():
            setattr(cfg.model, key, str(Path(value).expanduser().resolve()))

    accelerator = _accelerator(tc, cpu=device is not None and torch.device(device).type == "cpu")
    set_seed(tc.seed)  # encoder initialisation
    d = cfg.data  # scanned first: a bad data path fails before a large model is loaded
    dataset = ImageFolderDataset(d.root, d.resolution, d.templates, d.extensions, d.manifest, d.splits,
                                 d.use_source, d.hflip, d.scale_min, d.categories)
    # The frozen base is held in train.base_dtype (bf16/fp16 halves its memory); autocast runs the
    # matmuls in train.mixed_precision; the encoder's master weights and AdamW state stay fp32.
    base = load_base(cfg.model.pretrained, cfg.model.image_tower, revision=cfg.model.revision,
                     variant=cfg.model.variant, torch_dtype=tc.base_dtype, device=accelerator.device)
    if tc.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    dataset.resolution = d.resolution or base.resolution
    system = EncoderSystem(base, cfg)
    optimizer = torch.optim.AdamW(system.encoder.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    encoder, optimizer = accelerator.prepare(system.encoder, optimizer)
    system.encoder = encoder
    generator = torch.Generator().manual_seed(_mix(tc.seed, "noise", accelerator.process_index))

    step, position, epoch, loss_value = 0, 0, 0, float("nan")
    if ckpt_dir is not None:
        meta = _load_checkpoint(accelerator, ckpt_dir, cfg, encoder, optimizer, scheduler, generator)
        step, position, epoch, loss_value = meta["step"], meta["position"], meta["epoch"], meta["loss"]
        log.info("resumed from %s at step %d", ckpt_dir, step)
    per_step = tc.batch_size * tc.grad_accum * accelerator.num_processes
    sampler = _ShardPositions(position, tc.batch_size, tc.grad_accum, accelerator.num_processes,
                              accelerator.process_index)
    first = list(itertools.islice(iter(sampler), tc.batch_size * tc.grad_accum))
    log.info("process %d/%d reads stream positions %s at step %d", accelerator.process_index,
             accelerator.num_processes, first, step + 1)
    loader = torch.utils.data.DataLoader(
        _Stream(dataset, tc.seed), batch_size=tc.batch_size, num_workers=d.num_workers, sampler=sampler)
    batches = iter(loader)

    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, step)
    stop = tc.steps if max_steps is None else min(tc.steps, step + max_steps)
    bar = tqdm(total=tc.steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process)
    start_step, start_time = step, time.perf_counter()
    window = {"time": start_time, "terms": {}, "n": 0, "nearest": []}
    encoder.train()
    while step < stop:
        terms_sum: dict[str, float] = {}
        for _ in range(tc.grad_accum):
            pixels, prompts = next(batches)
            with accelerator.accumulate(encoder):
                with accelerator.autocast():
                    terms, pred = system.training_step(pixels.to(accelerator.device), list(prompts), generator)
                # collapse watch: the nearest real word of every prediction in the log window
                window["nearest"] += nearest_tokens(pred.embedding.detach(), system.vocab_table, 1)[0][:, 0].tolist()
                loss = sum(terms.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(encoder.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + float(value.detach()) / tc.grad_accum
        scheduler.step()
        step += 1
        position += per_step
        epoch = position // len(dataset)
        for name, value in terms_sum.items():
            window["terms"][name] = window["terms"].get(name, 0.0) + value
        window["n"] += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in {"loss": sum(terms_sum.values()), **terms_sum}.items()})

        if step % tc.log_every == 0 or step == stop:
            names = sorted(window["terms"])
            means = torch.tensor([window["terms"][k] / window["n"] for k in names], device=accelerator.device)
            means = accelerator.reduce(means, "mean").tolist()
            loss_value = sum(means)  # the reported loss: mean over processes and the log window
            now = time.perf_counter()
            row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                   "loss": sum(means), **dict(zip(names, means)),
                   "s_per_step": (now - window["time"]) / window["n"],
                   # this process's predictions since the last row (a collapse: few words, one dominant)
                   **{f"health_{k}": v for k, v in nearest_word_stats(window["nearest"]).items()}}
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            window = {"time": now, "terms": {}, "n": 0, "nearest": []}
        if tc.sample_every > 0 and step % tc.sample_every == 0 and accelerator.is_main_process:
            system.encoder = accelerator.unwrap_model(encoder).eval()
            _sample_grid(system, dataset, cfg, out / "samples" / f"step_{step:06d}.png")
            system.encoder = encoder.train()
        if step % tc.checkpoint_every == 0 or step == stop:
            scalars = {"step": step, "epoch": epoch, "position": position, "loss": loss_value,
                       "config": to_dict(cfg)}
            _save_checkpoint(accelerator, out, encoder, optimizer, scheduler, generator, scalars)
    bar.close()

    elapsed = time.perf_counter() - start_time
    ran = step - start_step
    result = TrainResult(step, ran, elapsed / max(1, ran), loss_value, out, accelerator.is_main_process)
    if accelerator.is_main_process:
        system.encoder = accelerator.unwrap_model(encoder)
        system.save(out / "encoder", {"step": step, "complete": step >= tc.steps, "epoch": epoch,
                                      "final_loss": loss_value, "images": len(dataset)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file or shipped name (tiny, minisd_encoder, sd15)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT/checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N steps in this invocation (checkpointed; the LR schedule still spans train.steps)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default): accelerate's device per process, CUDA when present; cpu forces the CPU")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="precision of the frozen base (sets train.base_dtype; default: the config's, fp32)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.base_dtype={args.dtype}"] if args.dtype else [])
    cfg = load_config(args.config, overrides)
    if args.max_steps is not None and args.max_steps < 1:
        raise DatencoderError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.device == "cuda":
        resolve_device(args.device)  # a missing CUDA is a one-line error
    result = train(cfg, resume=args.resume, max_steps=args.max_steps,
                   device=None if args.device == "auto" else args.device)
    if result.is_main:
        print(f"pretrain: step {result.step}/{cfg.train.steps} ({result.steps_this_run} this run), "
              f"{result.seconds_per_step:.3f} s/step, final loss {result.final_loss:.4f}, "
              f"encoder in {result.output_dir / 'encoder'}")
    return 0
