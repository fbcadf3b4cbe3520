"""Preparing a base model for concepts: the one step that changes the caller's base in place.

Tuning, the baselines and generation all need the same three changes to a loaded ``BaseModel``:

- every module frozen (``requires_grad=False``, eval mode);
- the placeholder token added to every tokenizer, and each text encoder's input-embedding table
  grown by one row (initialised to the mean row) when the token is new;
- a ``DualPathProcessor`` installed on every UNet attention layer (they are the vanilla
  attention until a call passes ``cross_attention_kwargs={"adapter": ...}``).

``prepare_base`` makes them and reports which were needed; a second call changes nothing. It
imports only the token and attention code, so generation does not load the encoder stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .attention import DualPathProcessor, install_processors
from .conditioning import add_placeholders

__all__ = ["BasePreparation", "prepare_base"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BasePreparation:
    """What ``prepare_base`` found and changed."""

    token_id: int
    """The placeholder's id in the first tokenizer."""
    token_added: bool
    """The token was new: added to the tokenizers, embedding tables grown by one row."""
    processors_installed: bool
    """The dual-path processors replaced the UNet's attention processors."""

    @property
    def changed(self) -> bool:
        return self.token_added or self.processors_installed


def prepare_base(base, token: str) -> BasePreparation:
    """Freeze ``base``, add ``token`` to every tokenizer / text encoder and install the dual-path
    processors, each only if not done yet (idempotent); return what was changed."""
    base.freeze()
    before = [(len(tok), te.get_input_embeddings().num_embeddings) for tok, te in base.text_encoders]
    token_id = add_placeholders(base, token)
    new = before != [(len(tok), te.get_input_embeddings().num_embeddings) for tok, te in base.text_encoders]
    install = not all(isinstance(p, DualPathProcessor) for p in base.unet.attn_processors.values())
    if install:
        install_processors(base.unet)
    done = BasePreparation(token_id, new, install)
    if done.changed:
        log.info("prepared the base model in place: %s", ", ".join(
            what for what, flag in ((f"added the token {token!r} (embedding tables grown)", new),
                                    ("installed the dual-path attention processors", install)) if flag))
    return done
