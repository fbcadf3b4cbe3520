"""Where the emoji art comes from: npm packages, the Debian Noto font, and rasterising them.

Kept apart from :mod:`datencoder.emoji.data` so the pure helpers run without npm or apt.
Every missing tool is a ``DatencoderError`` that names exactly what to install.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import DatencoderError
from ..io import write_atomic
from .data import CANVAS, Concept, fit_square, normalize_key

__all__ = ["NPM_PACKAGES", "Sources", "discover_sources", "load_openmoji_concepts",
           "noto_supports", "render_source"]

log = logging.getLogger(__name__)

# Pinned so the same command gives the same art.
NPM_PACKAGES = {"@twemoji/svg": "15.0.0", "openmoji": "17.0.0", "@lobehub/fluent-emoji-3d": "1.1.0"}
NOTO_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
                   "/usr/share/fonts/noto/NotoColorEmoji.ttf")
NOTO_PIXEL_SIZE = 109  # the only size the bitmap (CBDT) font can be drawn at
DEFAULT_NPM_CACHE = Path("~/.cache/datencoder/npm").expanduser()
# OpenMoji groups that are not Unicode emoji (OpenMoji-only extras) or are bare components.
_SKIPPED_GROUPS = {"extras-openmoji", "extras-unicode", "component"}
_SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}


@dataclass
class Sources:
    noto_font: Path
    twemoji_dir: Path
    openmoji_dir: Path
    openmoji_json: Path
    fluent3d_dir: Path
    versions: dict[str, str] = field(default_factory=dict)


def _npm_version(root: Path, package: str) -> str | None:
    meta = root / "node_modules" / package / "package.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("version")


def _ensure_npm(cache: Path) -> None:
    missing = [p for p, v in NPM_PACKAGES.items() if _npm_version(cache, p) != v]
    if not missing:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise DatencoderError("npm not found: install Node.js and npm (e.g. apt-get install "
                              "-y npm), then rerun 'datencoder data emoji'")
    cache.mkdir(parents=True, exist_ok=True)
    specs = [f"{p}@{NPM_PACKAGES[p]}" for p in missing]
    log.info("npm install --prefix %s %s", cache, " ".join(specs))
    result = subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                             *specs], capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise DatencoderError(f"npm install of {' '.join(specs)} failed ({tail[0]}); "
                              "check the npm registry is reachable or pass another --cache")


def _noto_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fonts-noto-color-emoji"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def discover_sources(cache: Path | None = None) -> Sources:
    """Find (installing the npm packages if needed) every source; raise if one is missing."""
    try:
        import cairosvg  # noqa: F401  (only checked here; workers import it to rasterise)
    except (ImportError, OSError) as err:
        raise DatencoderError(f"cairosvg is unavailable ({err}): pip install cairosvg "
                              "(and apt-get install -y libcairo2)") from err
    font = next((Path(p) for p in NOTO_FONT_PATHS if Path(p).is_file()), None)
    if font is None:
        raise DatencoderError("Noto Color Emoji font not found: "
                              "apt-get update && apt-get install -y fonts-noto-color-emoji")
    cache = Path(cache or DEFAULT_NPM_CACHE).expanduser()
    _ensure_npm(cache)
    modules = cache / "node_modules"
    versions = {p: _npm_version(cache, p) for p in NPM_PACKAGES}
    versions["fonts-noto-color-emoji (Debian)"] = _noto_version()
    return Sources(
        noto_font=font,
        twemoji_dir=modules / "@twemoji/svg",
        openmoji_dir=modules / "openmoji/color/svg",
        openmoji_json=modules / "openmoji/data/openmoji.json",
        fluent3d_dir=modules / "@lobehub/fluent-emoji-3d/assets",
        versions=versions,
    )


def index_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Map normalised key -> file for every ``*suffix`` file named by its codepoints."""
    out: dict[str, Path] = {}
    for path in sorted(folder.glob(f"*{suffix}")):
        out.setdefault(normalize_key(path.name[: -len(suffix)]), path)
    return out


def load_openmoji_concepts(path: Path) -> list[Concept]:
    """Base (no skin tone) Unicode emoji with names and categories, in OpenMoji order."""
    seen: dict[str, Concept] = {}
    for row in json.loads(Path(path).read_text()):
        key = normalize_key(row["hexcode"])
        skin_tone = row.get("skintone") or _SKIN_TONES & set(key.split("-"))
        if row["group"] in _SKIPPED_GROUPS or skin_tone:
            continue
        tags = tuple(t.strip() for t in row.get("tags", "").split(",") if t.strip())
        seen.setdefault(key, Concept(key, row["emoji"], row["annotation"], row["group"],
                                     row["subgroups"], tags))
    return list(seen.values())


_FONT_CACHE: dict[str, ImageFont.FreeTypeFont] = {}


def _font(path: str) -> ImageFont.FreeTypeFont:
    if path not in _FONT_CACHE:
        _FONT_CACHE[path] = ImageFont.truetype(path, NOTO_PIXEL_SIZE)
    return _FONT_CACHE[path]


def noto_supports(font_path: Path, text: str) -> bool:
    """True when the font shapes ``text`` into one glyph (an unsupported ZWJ sequence
    falls apart into several glyphs, each one advance wide)."""
    font = _font(str(font_path))
    return font.getlength(text) <= 1.2 * font.getlength("\U0001F600")


def _render_noto(font_path: str, text: str) -> Image.Image:
    font = _font(font_path)
    side = 2 * NOTO_PIXEL_SIZE
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((NOTO_PIXEL_SIZE // 4,) * 2, text, font=font, embedded_color=True)
    return image


def _render_svg(path: str, side: int = 4 * CANVAS) -> Image.Image:
    import io

    import cairosvg

    png = cairosvg.svg2png(url=path, output_width=side, output_height=side)
    return Image.open(io.BytesIO(png)).convert("RGBA")


def render_source(task: tuple[str, str, str]) -> tuple[str, bool]:
    """Worker: (kind, reference, out_png) -> (out_png, ok). kind is 'noto', 'svg' or 'raster';
    reference is 'font_path|text' for noto, else a file path. Writes a 64x64 RGBA PNG atomically."""
    kind, ref, out = task
    try:
        if kind == "noto":
            font_path, text = ref.split("|", 1)
            image = _render_noto(font_path, text)
        elif kind == "svg":
            image = _render_svg(ref)
        else:
            image = Image.open(ref).convert("RGBA")
        square = fit_square(image, CANVAS)
    except Exception as err:  # one broken file must not stop a build of thousands
        log.debug("render failed for %s: %s", ref, err)
        return out, False
    write_atomic(out, lambda tmp: square.save(tmp, format="PNG"))
    return out, True
