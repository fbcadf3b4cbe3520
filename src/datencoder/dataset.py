"""Pre-training images: a folder of images (any domain, no labels) or the rows of a JSONL manifest.

The encoder is pre-trained on a broad image set with no domain labels and no masks (METHOD.md).
Each item is one augmented view of one image plus a prompt template holding S*. With a manifest,
templates may name the row's fields in braces (``"S*, {position}, on {a_background} background"``;
``{a_X}`` is X with its article): what the caption already says about the image (its background,
layout) the base draws from the prompt, so S* need not carry it. All randomness
of an item comes from the generator the caller passes, so a training loop that seeds it from the
item's position in its data stream reproduces every item exactly after a resume.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from .augment import augment_views
from .errors import DatencoderError
from .image_io import image_to_tensor, load_image

__all__ = ["ImageFolderDataset", "scan_images", "read_manifest_files", "read_manifest_rows", "template_fields",
           "fill_template"]

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def scan_images(root: str | Path, extensions=DEFAULT_EXTENSIONS) -> list[Path]:
    """Every image file under ``root`` (recursive), sorted by relative path so the order is fixed."""
    root = Path(root)
    if not root.is_dir():
        raise DatencoderError(f"data folder {root} does not exist; set data.root to a folder of images")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = [p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_fields(templates) -> set[str]:
    """The manifest fields that prompt templates name in braces: {"position", "a_background"}."""
    return {name for t in templates for name in _FIELD.findall(t)}


def _field(row: dict, name: str) -> str | None:
    if name in row:
        return str(row[name])
    if name.startswith("a_") and name[2:] in row:
        value = str(row[name[2:]])
        return f"{'an' if value[:1].lower() in 'aeiou' else 'a'} {value}"
    return None


def fill_template(template: str, row: dict) -> str:
    """The template with each {field} replaced by the row's value ({a_X}: X with its article)."""
    def value(match: re.Match) -> str:
        got = _field(row, match.group(1))
        if got is None:
            raise DatencoderError(f"prompt template {template!r} names {{{match.group(1)}}}, which the manifest "
                                  "row has not; use the manifest's fields or drop the braces")
        return got
    return _FIELD.sub(value, template)


def read_manifest_files(manifest: str | Path, splits, use_source: bool = False,
                        categories=None) -> list[Path]:
    """Image paths of the manifest rows whose ``split`` is in ``splits`` (relative to its folder).

    ``categories`` (optional) also keeps only rows whose ``category`` is listed.
    """
    return [path for path, _ in read_manifest_rows(manifest, splits, use_source, categories)]


def read_manifest_rows(manifest: str | Path, splits, use_source: bool = False,
                       categories=None) -> list[tuple[Path, dict]]:
    """(image path, row) of the manifest rows whose ``split`` is in ``splits``; see read_manifest_files."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatencoderError(f"manifest {manifest} not found; set data.manifest to a JSONL file")
    key = "source" if use_source else "file"
    wanted, files, seen = set(splits), [], set()
    with manifest.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DatencoderError(f"{manifest} line {number} is not valid JSON; rebuild the manifest") from None
            if row.get("split") not in wanted or (categories is not None and row.get("category") not in categories):
                continue
            if key not in row:
                raise DatencoderError(f"{manifest} line {number} has no '{key}' key; "
                                      f"set data.use_source={'false' if use_source else 'true'} or rebuild it")
            path = manifest.parent / row[key]
            # Clean sources are shared by several composed rows: each source image counts once.
            if path not in seen:
                seen.add(path)
                files.append((path, row))
    return files


class ImageFolderDataset(torch.utils.data.Dataset):
    """``dataset.item(i, generator)`` -> (pixels [3, S, S] in [-1, 1], prompt with S*).

    ``dataset[i]`` is the same with a generator seeded by ``i`` (for a plain DataLoader).
    """

    def __init__(self, root: str | Path, resolution: int, templates: list[str],
                 extensions=DEFAULT_EXTENSIONS, manifest: str | Path | None = None,
                 splits=("train",), use_source: bool = False, hflip: bool = True,
                 scale_min: float = 1.0, categories=None, pair_by: str | None = None,
                 pair_input: str = "file"):
        if resolution < 0:
            raise DatencoderError(f"data resolution must be >= 1 (or 0: set later), got {resolution}")
        if not templates:
            raise DatencoderError("data.templates is empty; give at least one prompt template with S*")
        fields = template_fields(templates)
        self.rows: list[dict] | None = None
        # a pair's target is never flipped: only its input's augmentation mirrors
        if hflip and pair_by is None and {"position", "a_position"} & fields:
            raise DatencoderError("data.templates name {position}, but data.hflip mirrors left and right; "
                                  "set data.hflip=false")
        self.pair_by = pair_by
        self.targets: list[Path] | None = None
        self._groups: list[list[int]] = []
        if pair_by is not None and not manifest:
            raise DatencoderError("data.pair_by needs data.manifest=FILE.jsonl (a plain folder has no fields "
                                  "to pair its images by)")
        if manifest:
            rows = read_manifest_rows(manifest, splits, use_source, categories)
            self.files = [path for path, _ in rows]
            where = f"manifest {manifest} (splits {list(splits)}, categories {categories or 'all'})"
            if pair_by is not None:
                self._pair(Path(manifest), rows, pair_by, pair_input, use_source)
                fields = fields | {pair_by}
            if fields:
                if use_source:
                    raise DatencoderError(f"data.templates name manifest fields {sorted(fields)}, but a clean source "
                                          "is shared by several rows; set data.use_source=false")
                for path, row in rows:
                    missing = sorted(f for f in fields if _field(row, f) is None)
                    if missing:
                        raise DatencoderError(f"data.templates name {missing}, which the manifest row of {path.name} "
                                              "has not; use the manifest's fields or drop the braces")
                self.rows = [row for _, row in rows]
        else:
            if fields:
                raise DatencoderError(f"data.templates name manifest fields {sorted(fields)}; they need "
                                      "data.manifest=FILE.jsonl (a plain folder has no fields)")
            if not str(root):
                raise DatencoderError("data.root is empty; set data.root=FOLDER or data.manifest=FILE.jsonl")
            if categories is not None:
                raise DatencoderError("data.categories needs a manifest with categories; set data.manifest=FILE.jsonl")
            self.files = scan_images(root, extensions)
            where = f"folder {root}"
        if not self.files:
            raise DatencoderError(f"no images in {where}; add {'/'.join(extensions)} files or fix the path")
        # 0 = not known yet: the recipe scans the data before loading the (large) base model, then
        # sets the base's resolution.
        self.resolution = resolution
        self.templates = list(templates)
        self.hflip = hflip
        self.scale_min = scale_min
        self._bad: set[int] = set()
        log.info("%d training images from %s", len(self.files), where)

    def _pair(self, manifest: Path, rows: list[tuple[Path, dict]], pair_by: str, pair_input: str,
              use_source: bool) -> None:
        """Paired items: targets are the rows' composed files; inputs their files or sources."""
        if use_source:
            raise DatencoderError("data.pair_by pairs composed rows; set data.use_source=false "
                                  "(data.pair_input=source gives the encoder the clean render)")
        if pair_input not in ("file", "source"):
            raise DatencoderError(f"data.pair_input must be 'file' or 'source', got {pair_input!r}")
        missing = next((path.name for path, row in rows if pair_by not in row), None)
        if missing is not None:
            raise DatencoderError(f"data.pair_by={pair_by!r}, but the manifest row of {missing} has no such field; "
                                  "name a field every row has (concept)")
        if pair_input == "source":
            lacking = next((path.name for path, row in rows if "source" not in row), None)
            if lacking is not None:
                raise DatencoderError(f"data.pair_input=source, but the manifest row of {lacking} has no 'source'; "
                                      "set data.pair_input=file")
            self.files = [manifest.parent / row["source"] for _, row in rows]
        self.targets = [path for path, _ in rows]
        members: dict[str, list[int]] = {}
        for i, (_, row) in enumerate(rows):
            members.setdefault(str(row[pair_by]), []).append(i)
        own = pair_input == "source"  # a clean source and its own composed row are two renders
        self._groups = [[j for j in members[str(row[pair_by])] if own or j != i or len(members[str(row[pair_by])]) == 1]
                        for i, (_, row) in enumerate(rows)]
        self.pair_input = pair_input

    @property
    def paired(self) -> bool:
        return self.targets is not None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Tensor:
        # Small images are upsampled rather than refused, unless they are tiny icons.
        return image_to_tensor(load_image(path, min_size=min(32, self.resolution)), self.resolution)

    def clean(self, index: int) -> Tensor:
        """The image at ``index`` (or the next readable one) without augmentation: [3, S, S]."""
        return self._clean(index)[1]

    def _clean(self, index: int) -> tuple[int, Tensor]:
        if self.resolution < 1:
            raise DatencoderError("set the dataset's resolution before reading images")
        n = len(self.files)
        while (i := self._readable(index)) is not None:
            try:
                pixels = self._load(self.files[i])
                if self.targets is not None and self.targets[i] != self.files[i]:
                    self._load(self.targets[i])  # a pair's target must be readable too
                return i, pixels
            except DatencoderError as err:
                # A bad file is skipped for the whole run; the substitute is always the next
                # readable file, so the data order stays a pure function of the positions.
                self._bad.add(i)
                log.warning("skipping unreadable training image: %s", err)
        raise DatencoderError(f"none of the {n} training images is readable; check the data folder")

    def pair_item(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor, str]:
        """(the encoder's augmented image, the target render [3, S, S], the prompt filled with the
        target row's fields): the target is a row of the same ``pair_by`` group, drawn by ``generator``."""
        if self.targets is None:
            raise DatencoderError("this data set has no pairs; set data.pair_by=FIELD with a manifest")
        i, clean = self._clean(index)
        pixels = augment_views(clean, 1, generator, self.hflip, self.scale_min)[0]
        group = [j for j in self._groups[i] if j not in self._bad] or [i]
        j = group[int(torch.randint(0, len(group), (), generator=generator))]
        try:
            target = self._load(self.targets[j])
        except DatencoderError as err:
            self._bad.add(j)
            log.warning("skipping unreadable training image: %s", err)
            j, target = i, self._load(self.targets[i])
        pick = int(torch.randint(0, len(self.templates), (), generator=generator))
        return pixels, target, fill_template(self.templates[pick], self.rows[j])

    def _readable(self, index: int) -> int | None:
        """The first file at or after ``index`` (cyclically) not known to be unreadable."""
        n = len(self.files)
        return next(((index + k) % n for k in range(n) if (index + k) % n not in self._bad), None)

    def item(self, index: int, generator: torch.Generator) -> tuple[Tensor, str]:
        i, clean = self._clean(index)
        pixels = augment_views(clean, 1, generator, self.hflip, self.scale_min)[0]
        pick = int(torch.randint(0, len(self.templates), (), generator=generator))
        template = self.templates[pick]
        if self.rows is not None:
            template = fill_template(template, self.rows[i])  # the row of the image read
        return pixels, template

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.item(index, torch.Generator().manual_seed(index))
