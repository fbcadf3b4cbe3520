"""What the web app does, without the web page: one loaded model, per-session concepts, limits.

``Studio`` holds the encoder system (base model + encoder, loaded once per process) and turns
requests into library calls: ``tuning.personalize``, ``ConceptPipeline``, ``export.export_concept``.
Every check happens here, before any compute, so the page and the tests see the same one-line
``DatencoderError`` messages. Files are written only under the studio's own folder, one
sub-folder per browser session; uploaded files are read only from the upload folder the web
server itself wrote.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ...concept import Concept
from ...errors import DatencoderError
from ...export import export_concept
from ...image_io import image_to_tensor, load_image
from ...pipeline import ConceptPipeline
from ...system import EncoderSystem
from ...tuning import personalize

log = logging.getLogger("datencoder.app")

Progress = Callable[[float, str], None]
"""progress(fraction in [0, 1], description)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; stated on the page and enforced here."""

    max_upload_mb: int = 10
    max_megapixels: float = 16.0
    max_steps: int = 50
    max_images: int = 8
    max_sample_steps: int = 100
    max_guidance: float = 20.0
    max_prompt_chars: int = 300
    max_concepts: int = 20  # per session; the oldest is dropped beyond this


class Cancelled(DatencoderError):
    """The user pressed Stop; the run ended at the next step."""


@dataclass
class Session:
    """One browser session: its folder, its concepts (label -> folder) and its Stop flag."""

    folder: Path
    concepts: dict[str, Path] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)

    def __deepcopy__(self, memo) -> "Session":
        # a handle on a folder and a flag, not a value: web frameworks that copy their state
        # (gradio does) must hand every request of the session this same object
        return self


@dataclass
class Personalized:
    label: str
    concept: Concept
    summary: str
    concept_zip: Path
    diffusers_zip: Path


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DatencoderError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    if not low <= int(value) <= high:
        raise DatencoderError(f"{name} must be from {low} to {high}, got {int(value)}")
    return int(value)


def _within(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


class Studio:
    def __init__(self, system: EncoderSystem, folder: str | Path, upload_root: str | Path,
                 limits: Limits = Limits()):
        self.system = system
        self.folder = Path(folder)
        self.upload_root = Path(upload_root)
        self.limits = limits
        self.lock = threading.Lock()  # one model: one run at a time, whatever the caller
        self.closing = threading.Event()
        self.placeholder = system.cfg.model.placeholder

    # -- sessions -----------------------------------------------------------------------------
    def new_session(self) -> Session:
        folder = self.folder / "sessions" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return Session(folder)

    def close_session(self, session: Session | None) -> None:
        if session is not None and _within(session.folder, self.folder):
            shutil.rmtree(session.folder, ignore_errors=True)

    @staticmethod
    def stop(session: Session | None) -> None:
        if session is not None:
            session.cancel.set()

    def _check_cancel(self, session: Session) -> None:
        if session.cancel.is_set() or self.closing.is_set():
            raise Cancelled("stopped; nothing was kept from this run")

    def shutdown(self, timeout: float = 60.0) -> None:
        """End a running request at its next step and wait for it, so the process exits cleanly."""
        self.closing.set()
        if self.lock.acquire(timeout=timeout):
            self.lock.release()

    # -- checks -------------------------------------------------------------------------------
    def check_upload(self, path: str | Path | None, name: str | None = None) -> tuple[Path, str]:
        """A file the web server received -> (its path, the name to show); anything else refused."""
        if path is None or str(path) == "":
            raise DatencoderError("no image: upload one or pick a bundled example")
        path = Path(path)
        shown = Path(name).name if name else path.name
        # The client only ever names files by the paths the server gave it; a path elsewhere
        # (e.g. /etc/passwd) is refused before it is opened.
        if not _within(path, self.upload_root) or not path.is_file():
            raise DatencoderError(f"{shown} is not an uploaded file; upload the image again")
        size_mb = path.stat().st_size / 2**20
        if size_mb > self.limits.max_upload_mb:
            raise DatencoderError(f"{shown} is {size_mb:.1f} MB, more than the limit of "
                                  f"{self.limits.max_upload_mb} MB; use a smaller image")
        return path, shown

    def check_generation(self, prompt: str, seed, num_images, guidance,
                         sample_steps) -> tuple[str, int, int, float, int]:
        lim = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatencoderError(f"the prompt is empty; write e.g. \"a photo of {self.placeholder} on the beach\"")
        prompt = prompt.strip()
        if len(prompt) > lim.max_prompt_chars:
            raise DatencoderError(f"the prompt has {len(prompt)} characters, more than {lim.max_prompt_chars}")
        if self.placeholder not in prompt:
            raise DatencoderError(f"the prompt {prompt!r} does not contain {self.placeholder}; write e.g. "
                                  f"\"{self.placeholder}, on a blue background\"")
        seed = _check_int("seed", seed, 0, 2**31 - 1)
        num_images = _check_int("number of images", num_images, 1, lim.max_images)
        sample_steps = _check_int("sampling steps", sample_steps, 1, lim.max_sample_steps)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= lim.max_guidance:
            raise DatencoderError(f"guidance must be a number from 0 to {lim.max_guidance:g}, got {guidance!r}")
        return prompt, seed, num_images, float(guidance), sample_steps

    # -- work ---------------------------------------------------------------------------------
    def personalize(self, session: Session, path: str | Path | None, steps, name: str | None = None,
                    progress: Progress | None = None) -> Personalized:
        """Encoder prediction + ``steps`` tuning steps (seed 0, as the CLI) -> a saved concept."""
        steps = _check_int("tuning steps", steps, 0, self.limits.max_steps)
        path, shown = self.check_upload(path, name)
        try:
            image = load_image(path, max_pixels=int(self.limits.max_megapixels * 1e6), warn=True)
        except DatencoderError as err:  # name the user's file, not the server's copy of it
            raise DatencoderError(str(err).replace(str(path), shown)) from None
        progress = progress or (lambda fraction, desc: None)
        system = self.system
        with self.lock:
            session.cancel.clear()
            pixels = image_to_tensor(image, system.base.resolution).to(system.base.unet.device)

            def on_step(step: int, terms: dict[str, float]) -> None:
                self._check_cancel(session)
                progress((step + 1) / max(steps, 1), f"tuning step {step + 1}/{steps}")

            progress(0.0, "encoder prediction")
            concept = personalize(system, pixels, replace(system.cfg.tune, steps=steps, seed=0),
                                  callback=on_step, info={"image": shown})
        n = len(session.concepts) + 1
        label = f"{n}: {Path(shown).stem} ({steps} steps, '{concept.hard_word}')"
        folder = concept.save(session.folder / f"concept-{n}")
        concept_zip = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
        exported = export_concept(concept, session.folder / f"concept-{n}-diffusers", "diffusers")
        diffusers_zip = Path(shutil.make_archive(str(exported), "zip", root_dir=exported))
        session.concepts[label] = folder
        while len(session.concepts) > self.limits.max_concepts:
            session.concepts.pop(next(iter(session.concepts)))
        info = concept.info
        summary = (f"nearest word **{concept.hard_word}** · encoder {info['encoder_s']:.2f} s · "
                   f"tuning {info['tuning_s']:.2f} s ({steps} steps)")
        log.info("session %s: concept %s", session.folder.name, label)
        return Personalized(label, concept, summary, concept_zip, diffusers_zip)

    def generate(self, session: Session, label: str | None, prompt: str, seed=0, num_images=4,
                 guidance=7.5, dual_path: bool = True, sample_steps=25,
                 progress: Progress | None = None) -> list[Image.Image]:
        """Images of one of the session's concepts, exactly as ``datencoder generate`` makes them."""
        prompt, seed, num_images, guidance, sample_steps = self.check_generation(
            prompt, seed, num_images, guidance, sample_steps)
        if not session.concepts:
            raise DatencoderError("no concept yet: press Personalise first")
        folder = session.concepts.get(label) if label else list(session.concepts.values())[-1]
        if folder is None:
            raise DatencoderError(f"unknown concept {label!r}; pick one of this page's concepts")
        concept = Concept.load(folder)
        progress = progress or (lambda fraction, desc: None)
        with self.lock:
            session.cancel.clear()
            pipe = ConceptPipeline(self.system.base, concept)

            def on_step(_pipe, i: int, timestep, tensors: dict) -> dict:
                self._check_cancel(session)
                progress((i + 1) / sample_steps, f"sampling step {i + 1}/{sample_steps}")
                return tensors

            progress(0.0, "sampling")
            return pipe(prompt, num_images_per_prompt=num_images, num_inference_steps=sample_steps,
                        guidance_scale=guidance, seed=seed, dual_path=bool(dual_path),
                        callback_on_step_end=on_step).images
