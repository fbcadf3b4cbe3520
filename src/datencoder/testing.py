"""A tiny, real Stable-Diffusion-family model for tests and smoke runs.

``build_tiny_base`` writes a complete diffusers-layout folder (model_index.json, unet/, vae/,
scheduler/, tokenizer/, text_encoder/, optionally image_tower/) with random weights drawn from
``torch.manual_seed(seed)``. Stock ``StableDiffusionPipeline.from_pretrained`` loads it, and so
does :func:`datencoder.base.load_base`. It is a library helper (no pytest import) so that CLI tests
can build it in a subprocess too. Building takes well under a second on a 2-core CPU.

Two text-encoder families are offered so that code proves it is family-agnostic:
``"bert"`` (BertModel + WordPiece tokenizer, like the MiniLM default) and ``"clip"``
(CLIPTextModel + byte-level BPE tokenizer, like Stable Diffusion 1.x).

Three model families (``family=``): ``"sd1"`` (epsilon target), ``"sd2"`` (v-prediction, linear
attention projections, a GELU CLIP text tower standing in for OpenCLIP-H) and ``"sdxl"`` (the SDXL
block structure: a first level without attention, ``transformer_layers_per_block``, the
``text_time`` added embedding, and two CLIP text encoders — CLIPTextModel and
CLIPTextModelWithProjection, whose widths add up to the UNet's cross_attention_dim — sharing one
vocabulary, saved by ``StableDiffusionXLPipeline``).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .base import quiet_loading
from .errors import DatencoderError
from .io import atomic_dir

__all__ = ["build_tiny_base", "build_tiny_clip", "build_tiny_dino", "TINY_WORDS", "MAX_LENGTHS", "FAMILIES"]

log = logging.getLogger(__name__)

# Real lowercase words so prompts in tests ("a photo of a red dog on the beach") tokenize into
# whole-word tokens; the nearest-token regulariser filters the vocabulary to such words.
TINY_WORDS: tuple[str, ...] = tuple(
    """
    a an the of on in at with and or by to from for under over near behind beside inside
    photo picture painting drawing sketch render image emoji icon sticker cartoon illustration
    style portrait close up view top side front back small big large tiny little old new
    red orange yellow green blue purple pink brown black white grey gray gold silver colorful
    dog cat bird fish horse cow pig sheep rabbit mouse bear lion tiger fox wolf duck owl frog
    monkey panda elephant giraffe zebra snake turtle bee butterfly spider whale dolphin shark
    mug cup bowl plate bottle chair table lamp clock phone book bag hat shoe shirt car bus
    bike train plane boat ship house building tower bridge castle tree flower leaf rose
    apple banana cherry grape lemon pizza cake bread cookie candy toy ball robot doll teddy
    guitar piano drum camera computer key heart star moon sun cloud rain snow fire water
    beach forest mountain city street park garden desert ocean sea river lake field sky space
    kitchen room road snowy sunny rainy night day morning evening winter summer autumn spring
    face smile happy sad angry cute funny wearing holding sitting standing running jumping
    flying swimming sleeping eating playing made wood glass metal stone paper plastic wool
    is it its this that one two three very many sign symbol flag letter number person man
    woman boy girl baby king queen hand eye ghost alien monster
    """.split()
)
_WORDPIECE_SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "y", "ness")
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_TEXT_HIDDEN = 32
# The real sequence lengths: the embedded MiniLM pads to 32 tokens, every SD 1.x/2.x CLIP to 77.
# Lengths that no test batch divides keep a reshape that folds one prompt into several rows from
# passing silently (a tuning-batch bug once hid behind a length of 16).
MAX_LENGTHS = {"bert": 32, "clip": 77}
FAMILIES = ("sd1", "sd2", "sdxl")
# SDXL's two text encoders: distinct widths (and a projection width unlike both) so that a
# mixed-up split or a pooled vector taken from the wrong encoder fails on shape.
_SDXL_HIDDEN = (32, 48)
_SDXL_POOLED = 40
_SDXL_TIME_DIM = 8


def _unique(seq):
    return list(dict.fromkeys(seq))


def _bert_parts(max_length: int):
    from transformers import BertConfig, BertModel, BertTokenizer

    # Single letters and ## letters make every lowercase word tokenizable without [UNK].
    vocab = _unique(
        [*_BERT_SPECIALS, *TINY_WORDS, *_LETTERS, *(f"##{s}" for s in _WORDPIECE_SUFFIXES),
         *(f"##{c}" for c in _LETTERS), ".", ",", "!", "?", "-", "'", "*"]
    )
    # Loaded from written files: every transformers release reads them (some take no in-memory vocab).
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp, do_lower_case=True, model_max_length=max_length)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=_TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * _TEXT_HIDDEN, max_position_embeddings=max_length, pad_token_id=0,
    )
    return tokenizer, BertModel(config, add_pooling_layer=False)


def _bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that make each word one "word</w>" token, learned deterministically.

    Plain BPE training, each word counted once; ties between equally frequent pairs (nearly every
    pair here) go to the alphabetically first pair. A trainer that breaks ties in hash order gives
    a different vocabulary on every build, and with it different token ids and different models.
    """
    seqs = [(*w[:-1], w[-1] + "</w>") for w in _unique(words)]
    merges = []
    while seqs:
        counts = Counter(pair for seq in seqs for pair in zip(seq, seq[1:]))
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        merged = []
        for seq in seqs:
            out, i = [], 0
            while i < len(seq):
                if seq[i:i + 2] == pair:
                    out.append(pair[0] + pair[1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            if len(out) > 1:
                merged.append(tuple(out))
        seqs = merged
    return merges


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    # Byte-level BPE whose merges make each of TINY_WORDS one "word</w>" token, plus every
    # printable ASCII character with and without the end-of-word marker so any ASCII text encodes.
    chars = [chr(c) for c in range(33, 127)]
    merges = _bpe_merges(TINY_WORDS)
    vocab = _unique([_CLIP_BOS, _CLIP_EOS, *chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges)])
    # Written out as vocab.json + merges.txt, the files of a real CLIP tokenizer, and loaded from them.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def _clip_text(tokenizer, hidden: int, *, projection_dim: int | None = None, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        projection_dim=projection_dim or hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act=hidden_act,
    )
    return (CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection)(config)


def _clip_parts(max_length: int, hidden_act: str = "quick_gelu"):
    tokenizer = _clip_tokenizer(max_length)
    return tokenizer, _clip_text(tokenizer, _TEXT_HIDDEN, hidden_act=hidden_act)


def _unet(cross_attention_dim: int, family: str = "sd1"):
    from diffusers import UNet2DConditionModel

    if family == "sdxl":
        # SDXL's layout at small widths: no attention at the first level, several transformer
        # layers per block deeper down, linear projections, and the "text_time" added embedding of
        # the pooled text vector plus six size/crop numbers (6 * addition_time_embed_dim + pooled).
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            cross_attention_dim=cross_attention_dim, addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + _SDXL_POOLED,
        )
    # Two levels with cross-attention at both, so attention layers of two widths (8 and 16) exist
    # and code that sizes per-layer offsets from the config is exercised.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2,
        use_linear_projection=family == "sd2",
    )


def _vae():
    from diffusers import AutoencoderKL

    # Three levels -> vae_scale_factor 4 -> 32-pixel images for the 8x8 UNet latent.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def _image_tower(path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    CLIPVisionModel(config).save_pretrained(path)
    # Written by hand: building CLIPImageProcessor would need torchvision for its default backend.
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _pipeline(family: str, text_encoder: str):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear",
                              prediction_type="v_prediction" if family == "sd2" else "epsilon",
                              clip_sample=False, steps_offset=1)
    if family == "sdxl":
        # One vocabulary for both tokenizers, as in SDXL; the second pads with "!" like OpenCLIP's.
        tokenizer = _clip_tokenizer(MAX_LENGTHS["clip"])
        tokenizer_2 = copy.deepcopy(tokenizer)
        tokenizer_2.pad_token = "!"
        text_1 = _clip_text(tokenizer, _SDXL_HIDDEN[0])
        text_2 = _clip_text(tokenizer_2, _SDXL_HIDDEN[1], projection_dim=_SDXL_POOLED, hidden_act="gelu")
        unet = _unet(sum(_SDXL_HIDDEN), family)
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=text_1, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, add_watermarker=False,
        )
    if text_encoder == "bert":
        tokenizer, text_model = _bert_parts(MAX_LENGTHS["bert"])
    else:
        tokenizer, text_model = _clip_parts(MAX_LENGTHS["clip"], "gelu" if family == "sd2" else "quick_gelu")
    unet = _unet(text_model.config.hidden_size, family)  # drawn before the VAE: seeds keep their models
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_model, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_base(path: str | Path, *, seed: int = 0, text_encoder: str | None = None, family: str = "sd1",
                    with_image_tower: bool = True) -> Path:
    """Write a tiny diffusers-layout base model to ``path`` and return ``path``.

    ``text_encoder``: "bert" (the default for sd1) or "clip" (the default, and the only choice,
    for sd2 and sdxl). Deterministic given ``seed``; the caller's global RNG state is left
    untouched. ``path`` must not exist, be empty, or hold an earlier tiny model
    (model_index.json), which is replaced.
    """
    path = Path(path)
    if family not in FAMILIES:
        raise DatencoderError(f"unknown tiny model family {family!r}; use one of {', '.join(FAMILIES)}")
    text_encoder = text_encoder or ("bert" if family == "sd1" else "clip")
    if text_encoder not in ("bert", "clip"):
        raise DatencoderError(f"unknown tiny text encoder {text_encoder!r}; use 'bert' or 'clip'")
    if family != "sd1" and text_encoder != "clip":
        raise DatencoderError(f"the tiny {family} model has CLIP text encoders; drop text_encoder={text_encoder!r}")
    if path.exists() and (not path.is_dir() or (any(path.iterdir())
                                                 and not (path / "model_index.json").exists())):
        raise DatencoderError(f"{path} exists and is not a tiny model folder; pass a new path")
    with atomic_dir(path) as tmp, torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(seed)
        _pipeline(family, text_encoder).save_pretrained(tmp, safe_serialization=True)
        if with_image_tower:
            _image_tower(tmp / "image_tower")
    log.debug("built tiny base (%s, %s, seed %d) at %s", family, text_encoder, seed, path)
    return path


# -- tiny metric models (paper_metrics: CLIP-I, CLIP-T, DINO) ---------------------------------


def build_tiny_clip(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` folder (model, tokenizer, hand-written preprocessor config)."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(seed)
        tokenizer, _ = _clip_parts(MAX_LENGTHS["clip"])
        text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": MAX_LENGTHS["clip"],
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
        vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 2}
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    _write_processor(path, "CLIPImageProcessor", 36, 32, [0.48145466, 0.4578275, 0.40821073],
                     [0.26862954, 0.26130258, 0.27577711])
    return path


def build_tiny_dino(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ``Dinov2Model`` folder with a hand-written preprocessor config."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    with torch.random.fork_rng(devices=[]), quiet_loading():
        torch.manual_seed(seed)
        config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, mlp_ratio=2)
        Dinov2Model(config).save_pretrained(path)
    _write_processor(path, "BitImageProcessor", 36, 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return path


def _write_processor(path: Path, kind: str, resize: int, crop: int, mean: list, std: list) -> None:
    processor = {"image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": resize},
                 "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3, "image_mean": mean,
                 "image_std": std}
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
