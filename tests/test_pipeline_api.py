"""ConceptPipeline is called like a diffusers pipeline: num_images_per_prompt, generator,
callback_on_step_end, output_type, return_dict; the older num_images= and callback(step, total)
still work with a FutureWarning. On the tiny bases, with a concept whose dual path is on
(blend 0.5) and real (padded) prompt lengths; 3 images per prompt so that no batch size divides
another by accident.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput
from PIL import Image

from datencoder.base import load_base
from datencoder.concept import Concept
from datencoder.config import Config, from_dict
from datencoder.errors import DatencoderError
from datencoder.pipeline import ConceptPipeline, ConceptPipelineOutput
from datencoder.system import EncoderSystem

from test_export import _random_concept  # non-zero factors on every projection, a random embedding

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of S* on the beach"
PROMPTS = [PROMPT, "S*, small, on a red background"]
N = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd(tiny_base_dir):
    base = load_base(str(tiny_base_dir), with_image_tower=False)
    return ConceptPipeline(base, _random_concept(base, seed=1))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_base_dir):
    base = load_base(str(tiny_sdxl_base_dir), with_image_tower=False)
    concept = _random_concept(base, seed=1)
    embedding = 0.05 * torch.randn(sum(base.token_dims), generator=gen(2))  # both encoders' parts
    return ConceptPipeline(base, Concept(**{**vars(concept), "embedding": embedding, "token_dims": base.token_dims}))


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Images of the same noise made in batches of different sizes: equal up to the rounding of
    batched matrix products. Measured on the tiny base (2-core CPU, 1 thread): one image alone
    against the same image in a batch of 6, at most 1.5e-6 apart on 16 of 3072 values; another
    prompt or another noise moves them by more than 1e-2."""
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_generator_gives_the_images_of_the_same_seed(family, request):
    pipe = request.getfixturevalue(family)
    kwargs = dict(num_images_per_prompt=N, num_inference_steps=2, output_type="np")
    by_seed = pipe(PROMPT, seed=5, **kwargs).images
    assert by_seed.shape == (N, 32, 32, 3)
    assert np.array_equal(pipe(PROMPT, generator=gen(5), **kwargs).images, by_seed)
    assert np.array_equal(pipe(PROMPT, seed=99, generator=gen(5), **kwargs).images, by_seed)  # the generator wins
    assert np.abs(pipe(PROMPT, seed=6, **kwargs).images - by_seed).max() > 1e-2  # the seed matters


def test_images_come_prompt_major_and_equal_each_prompt_made_alone(sd):
    kwargs = dict(num_images_per_prompt=N, num_inference_steps=2, output_type="np")
    # one generator: the first prompt's images draw the first noise, as a call with that prompt only
    both = sd(PROMPTS, generator=gen(1), **kwargs).images
    assert both.shape == (2 * N, 32, 32, 3)
    _same(both[:N], sd(PROMPTS[0], generator=gen(1), **kwargs).images)
    # one generator per image: every image is the one its generator makes alone with its prompt
    both = sd(PROMPTS, generator=[gen(10 + k) for k in range(2 * N)], **kwargs).images
    _same(both[:N], sd(PROMPTS[:1], generator=[gen(10 + k) for k in range(N)], **kwargs).images)
    second = sd(PROMPTS[1:], generator=[gen(10 + k) for k in range(N, 2 * N)], **kwargs).images
    _same(both[N:], second)
    alone = sd(PROMPTS[1], num_images_per_prompt=1, num_inference_steps=2, output_type="np",
               generator=[gen(10 + N + 1)]).images
    _same(both[N + 1:N + 2], alone)
    # the prompt matters: the same noise under the other prompt is far from it
    assert np.abs(both[:N] - sd(PROMPTS[1:], generator=[gen(10 + k) for k in range(N)], **kwargs).images).max() > 1e-2
    with pytest.raises(DatencoderError, match=r"^5 generators for 6 images \(2 prompt\(s\) x 3 per prompt\); "
                                              r"pass one generator, or one per image$"):
        sd(PROMPTS, generator=[gen(k) for k in range(5)], **kwargs)


def test_callback_on_step_end_gets_diffusers_arguments_once_per_step(sd):
    steps, seen = 3, []

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        seen.append((pipe, step_index, int(timestep), sorted(callback_kwargs), callback_kwargs["latents"].clone()))
        return callback_kwargs

    kwargs = dict(num_images_per_prompt=N, num_inference_steps=steps, output_type="latent")
    latents = sd(PROMPT, generator=gen(2), callback_on_step_end=on_step_end, **kwargs).images
    assert [s[1] for s in seen] == list(range(steps))
    assert all(s[0] is sd.pipe for s in seen)  # diffusers' pipeline, as diffusers' callbacks expect
    assert [s[2] for s in seen] == sd.pipe.scheduler.timesteps.tolist()
    assert all(s[3] == ["latents"] for s in seen)
    assert seen[-1][4].shape == (N, 4, 8, 8) and torch.equal(seen[-1][4], latents)  # it reads the latents
    assert not torch.equal(seen[0][4], seen[1][4])
    assert torch.equal(sd(PROMPT, generator=gen(2), **kwargs).images, latents)  # watching changes nothing

    def zero_the_last(pipe, step_index, timestep, callback_kwargs):
        assert callback_kwargs["prompt_embeds"].shape[0] == 2 * N  # [unconditional, conditional]
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == steps - 1 else {}

    zeroed = sd(PROMPT, generator=gen(2), callback_on_step_end=zero_the_last,
                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kwargs).images
    assert not zeroed.any()  # what it returns replaces the sampler's tensors

    def stop(pipe, step_index, timestep, callback_kwargs):
        seen.append(step_index)
        pipe._interrupt = True  # diffusers' way to stop a run: the remaining steps are skipped
        return callback_kwargs

    seen.clear()
    sd(PROMPT, generator=gen(2), callback_on_step_end=stop, **kwargs)
    assert seen == [0]
    with pytest.raises(DatencoderError, match=r"^callback_on_step_end_tensor_inputs \['noise'\] are not offered "
                                              r"to the callback; choose from latents, prompt_embeds"):
        sd(PROMPT, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["noise"], **kwargs)


def test_the_output_is_a_diffusers_output_and_return_dict_false_a_tuple(sd):
    out = sd(PROMPT, num_images_per_prompt=N, num_inference_steps=2, generator=gen(3))
    assert isinstance(out, ConceptPipelineOutput) and isinstance(out, BaseOutput)
    assert out[0] is out.images and out["images"] is out.images and len(out) == 1
    assert len(out.images) == N and all(isinstance(image, Image.Image) for image in out.images)
    plain = sd(PROMPT, num_images_per_prompt=N, num_inference_steps=2, generator=gen(3), return_dict=False)
    assert type(plain) is tuple and len(plain) == 1 and isinstance(plain[0], list)
    assert [image.tobytes() for image in plain[0]] == [image.tobytes() for image in out.images]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_output_types_pil_np_pt_latent_are_the_same_images(family, request):
    pipe = request.getfixturevalue(family)

    def call(output_type):
        return pipe(PROMPT, num_images_per_prompt=N, num_inference_steps=2, generator=gen(4),
                    output_type=output_type).images

    pt, latents, array, pil = call("pt"), call("latent"), call("np"), call("pil")
    assert isinstance(pt, torch.Tensor) and pt.shape == (N, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert isinstance(latents, torch.Tensor) and latents.shape == (N, 4, 8, 8)
    assert isinstance(array, np.ndarray) and np.array_equal(array, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == N and np.array_equal(np.stack([np.asarray(p) for p in pil]),
                                            (array * 255).round().astype(np.uint8))
    with torch.no_grad():  # the latents are the ones the images were decoded from
        decoded = pipe.pipe.vae.decode(latents / pipe.pipe.vae.config.scaling_factor).sample
    assert torch.equal(pipe.pipe.image_processor.postprocess(decoded, output_type="pt"), pt)
    with pytest.raises(DatencoderError, match=r"^unknown output_type 'pillow'; choose one of pil, np, pt, latent$"):
        call("pillow")


def test_deprecated_num_images_and_callback_warn_and_give_the_same_images(sd):
    steps = []
    with pytest.warns(FutureWarning) as record:
        old = sd(PROMPT, num_images=N, num_inference_steps=3, seed=6, output_type="np",
                 callback=lambda step, total: steps.append((step, total))).images
    ours = [w for w in record if str(w.message).startswith("ConceptPipeline:")]
    messages = sorted(str(w.message) for w in ours)
    assert len(messages) == 2 and all(w.category is FutureWarning for w in ours)
    assert "callback(step, total) is deprecated" in messages[0]
    assert "num_images= is deprecated" in messages[1] and "num_images_per_prompt=" in messages[1]
    assert all(w.filename == __file__ for w in ours)  # the warning names the caller's line
    assert steps == [(0, 3), (1, 3), (2, 3)]
    new = sd(PROMPT, num_images_per_prompt=N, num_inference_steps=3, generator=gen(6), output_type="np",
             callback_on_step_end=lambda pipe, i, t, tensors: tensors).images
    assert old.shape == (N, 32, 32, 3) and np.array_equal(old, new)

    with pytest.raises(DatencoderError) as both:
        sd(PROMPT, num_images=2, num_images_per_prompt=2)
    assert str(both.value) == ("num_images is the deprecated name of num_images_per_prompt; "
                               "pass num_images_per_prompt only")
    with pytest.raises(DatencoderError) as both:
        sd(PROMPT, callback=lambda step, total: None, callback_on_step_end=lambda pipe, i, t, kw: kw)
    assert str(both.value) == ("callback(step, total) is the deprecated form of callback_on_step_end; "
                               "pass callback_on_step_end only")


def test_arguments_after_the_prompt_are_keywords_and_one_image_per_prompt_is_the_default(sd):
    with pytest.raises(TypeError):
        sd(PROMPT, 3)  # the old second positional argument was num_images: refused, not misread
    assert len(sd(PROMPTS, num_inference_steps=1).images) == 2
    with pytest.raises(DatencoderError, match="^num_images_per_prompt must be a whole number, got 2.5$"):
        sd(PROMPT, num_images_per_prompt=2.5)
    with pytest.raises(DatencoderError, match="^num_images_per_prompt and num_inference_steps must be at least 1$"):
        sd(PROMPT, num_images_per_prompt=0)


def test_negative_prompt_is_one_text_and_none_means_none(sd):
    kwargs = dict(num_images_per_prompt=N, num_inference_steps=1, generator=gen(7), output_type="np")
    empty = sd(PROMPT, negative_prompt="", **kwargs).images
    kwargs["generator"] = gen(7)
    assert np.array_equal(sd(PROMPT, negative_prompt=None, **kwargs).images, empty)
    with pytest.raises(DatencoderError, match=r"^negative_prompt must be one text \(used for every prompt\), "
                                              r"got \['a', 'b'\]$"):
        sd(PROMPTS, negative_prompt=["a", "b"])


# -- the documentation's pipeline code runs as printed ---------------------------------------------
def _python_block(path: Path, containing: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"{path.name}: {len(blocks)} python blocks contain {containing!r}"
    return blocks[0]


def _run(code: str, where: str, namespace: dict) -> dict:
    """Runs ``code``; a deprecated ConceptPipeline spelling in it is a failure, not a warning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(compile(code, where, "exec"), namespace)
    stale = [str(w.message) for w in record if str(w.message).startswith("ConceptPipeline:")]
    assert not stale, f"{where} uses a deprecated spelling: {stale}"
    return namespace


def test_readme_python_runs_as_printed(tiny_base_dir, tmp_path, monkeypatch):
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hidden_dim": 32},
                             "tune": {"steps": 2, "batch_size": 1}})
    EncoderSystem(load_base(str(tiny_base_dir)), cfg).save(tmp_path / "runs" / "sd15" / "encoder")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        tmp_path / "my_dog.jpg")
    monkeypatch.chdir(tmp_path)
    done = _run(_python_block(ROOT / "README.md", "ConceptPipeline("), "README.md", {})
    assert len(done["images"]) == 4 and all(isinstance(image, Image.Image) for image in done["images"])
    assert (tmp_path / "concepts" / "dog" / "concept.json").is_file()


def test_commands_md_python_runs_as_printed(tiny_base_dir, tmp_path, monkeypatch):
    base = load_base(str(tiny_base_dir), with_image_tower=False)
    _random_concept(base, seed=4).save(tmp_path / "concepts" / "dog")
    monkeypatch.chdir(tmp_path)
    _run(_python_block(ROOT / "docs" / "commands.md", "ConceptPipeline("), "docs/commands.md", {})
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000.png", "001.png", "002.png", "003.png"]


def test_architecture_md_call_runs_as_printed(sd):
    done = _run(_python_block(ROOT / "docs" / "architecture.md", "out = pipe("),
                "docs/architecture.md", {"pipe": sd, "torch": torch})
    assert isinstance(done["out"], ConceptPipelineOutput) and len(done["out"].images) == 6
