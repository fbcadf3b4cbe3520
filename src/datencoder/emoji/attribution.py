"""ATTRIBUTION.md and LICENSES.md written next to every emoji data set build."""

from __future__ import annotations

from pathlib import Path

from ..io import write_text_atomic

__all__ = ["write_attribution"]

_ATTRIBUTION = """# Emoji art: sources, licences, copyright holders

This data set is derived from four open-licence emoji sets. Every image under
`sources/{{style}}/` and `images/{{style}}/` is a re-rendering (cropped, resized to 64x64, and for
`images/` placed on a plain background) of the original art of that style. No Apple, Facebook/Meta,
Samsung or JoyPixels art is used.

| style | source | version | licence of the art | copyright holder |
|---|---|---|---|---|
| `noto` | Noto Color Emoji font, Debian package `fonts-noto-color-emoji` (https://github.com/googlefonts/noto-emoji) | {noto} | Apache-2.0 (images); the font file itself is SIL OFL 1.1 | Google Inc. and contributors |
| `twemoji` | npm `@twemoji/svg` (SVGs of https://github.com/jdecked/twemoji) | {twemoji} | CC-BY-4.0 (graphics); the npm packaging is MIT (c) Samuel Kopp | Twitter, Inc. and other contributors |
| `openmoji` | npm `openmoji` (https://openmoji.org) | {openmoji} | **CC-BY-SA-4.0** | OpenMoji / HfG Schwäbisch Gmünd and contributors |
| `fluent3d` | npm `@lobehub/fluent-emoji-3d` (Fluent Emoji 3D of https://github.com/microsoft/fluentui-emoji) | {fluent} | MIT | Microsoft Corporation (packaging (c) LobeHub) |

Names, categories, subcategories and tags come from OpenMoji's `data/openmoji.json`
(CC-BY-SA-4.0, OpenMoji).

Required attribution lines:

- Noto Color Emoji, (c) Google Inc., Apache License 2.0.
- Twemoji graphics (c) Twitter, Inc. and other contributors, licensed under CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/). Changes: rasterised, cropped, resized, recoloured background.
- All emojis in the `openmoji` style designed by OpenMoji - the open-source emoji and icon project.
  License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Changes: rasterised,
  cropped, resized, placed on coloured backgrounds.
- Fluent Emoji (c) Microsoft Corporation, MIT License.

See LICENSES.md for what this means for the derived images.
"""

_LICENSES = """# Licences of the derived images

- `sources/openmoji/*` and `images/openmoji/*` are adaptations of OpenMoji art and are therefore
  licensed **CC-BY-SA-4.0** (https://creativecommons.org/licenses/by-sa/4.0/): share them only
  under the same licence, with the OpenMoji attribution in ATTRIBUTION.md.
- `sources/twemoji/*` and `images/twemoji/*`: CC-BY-4.0, attribution to Twitter, Inc. and other
  contributors required.
- `sources/noto/*` and `images/noto/*`: Apache-2.0, (c) Google Inc.
- `sources/fluent3d/*` and `images/fluent3d/*`: MIT, (c) Microsoft Corporation.
- `manifest.jsonl` and `concepts.jsonl` carry names, categories and tags from OpenMoji's
  metadata: CC-BY-SA-4.0.

Whether a model trained on these images is an adaptation of them is not settled; this project
records the licences of everything it trained on in ATTRIBUTION.md so the question can be
answered per use.
"""


def write_attribution(out: Path, versions: dict[str, str]) -> None:
    fill = {"noto": versions.get("fonts-noto-color-emoji (Debian)", "unknown"),
            "twemoji": versions.get("@twemoji/svg", "unknown"),
            "openmoji": versions.get("openmoji", "unknown"),
            "fluent": versions.get("@lobehub/fluent-emoji-3d", "unknown")}
    write_text_atomic(Path(out) / "ATTRIBUTION.md", _ATTRIBUTION.format(**fill))
    write_text_atomic(Path(out) / "LICENSES.md", _LICENSES)
