"""datencoder: domain-agnostic tuning-encoder for fast personalization (Arar et al. 2023).

The public surface is small; everything else lives in the submodules named in
docs/architecture.md. Names are imported lazily so ``import datencoder`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_base": "datencoder.base",
    "BaseModel": "datencoder.base",
    "Config": "datencoder.config",
    "load_config": "datencoder.config",
    "EncoderSystem": "datencoder.system",
    "personalize": "datencoder.tuning",
    "Concept": "datencoder.concept",
    "ConceptPipeline": "datencoder.pipeline",
    "ConceptPipelineOutput": "datencoder.pipeline",
    "load_image": "datencoder.image_io",
    "DatencoderError": "datencoder.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datencoder' has no attribute {name!r}")
