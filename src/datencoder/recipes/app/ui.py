"""The page of ``datencoder app``: Gradio layout and wiring only; the work is in ``service.Studio``."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ...errors import DatencoderError
from .service import Studio

MODEL = "model"  # one concurrency group for every event that runs the model: one run at a time


def _progress(progress: gr.Progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


def build(studio: Studio, examples: list[Path], example_prompts: list[str]) -> gr.Blocks:
    lim = studio.limits
    s = studio.placeholder

    def on_personalise(upload, steps, session, progress=gr.Progress()):
        # preprocess=False: the image arrives as gradio's file record, read by the studio's own checks
        upload = upload if isinstance(upload, dict) else {}
        try:
            result = studio.personalize(session, upload.get("path"), steps, name=upload.get("orig_name"),
                                        progress=_progress(progress))
        except DatencoderError as err:
            raise gr.Error(str(err), print_exception=False) from None
        choices = list(session.concepts)
        return (result.summary, str(result.concept_zip), str(result.diffusers_zip),
                gr.Dropdown(choices=choices, value=result.label))

    def on_generate(label, prompt, seed, num_images, guidance, dual_path, sample_steps, session,
                    progress=gr.Progress()):
        try:
            images = studio.generate(session, label, prompt, seed, num_images, guidance, dual_path,
                                     sample_steps, progress=_progress(progress))
        except DatencoderError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return images

    def on_stop(session):
        studio.stop(session)
        gr.Info("Stopped: the running request ends at its next step; nothing is kept from it.")

    with gr.Blocks(title="datencoder") as page:
        # One Session per browser tab or API client, made on its first request. Plain functions,
        # not bound methods: gradio deep-copies these, and copying a bound method would copy the
        # studio with its models (seconds per request).
        state = gr.State(lambda: studio.new_session(), delete_callback=lambda session: studio.close_session(session))
        gr.Markdown(
            "## datencoder: one image in, your concept in new pictures\n"
            f"Upload one image (PNG, JPEG or WebP, up to {lim.max_upload_mb} MB and {lim.max_megapixels:g} "
            f"megapixels) or pick an example, press **Personalise**, then write prompts with **{s}**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Concept image", type="filepath", sources=["upload"], elem_id="image",
                                 height=256)
                gr.Examples([[str(p)] for p in examples], inputs=[image], label="Bundled examples")
                steps = gr.Slider(0, lim.max_steps, value=12, step=1, label="Tuning steps (0 = encoder only)",
                                  elem_id="steps")
                personalise = gr.Button("Personalise", variant="primary", elem_id="personalise")
                summary = gr.Markdown(elem_id="summary")
                with gr.Row():
                    concept_zip = gr.File(label="Concept folder (zip)", elem_id="concept_zip")
                    diffusers_zip = gr.File(label="diffusers export (zip)", elem_id="diffusers_zip")
            with gr.Column():
                concept = gr.Dropdown(label="Concept", choices=[], elem_id="concept")
                prompt = gr.Textbox(label=f"Prompt (must contain {s})", value=example_prompts[1],
                                    max_length=lim.max_prompt_chars, elem_id="prompt")
                gr.Examples([[p] for p in example_prompts], inputs=[prompt], label="Example prompts")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed", elem_id="seed")
                    num_images = gr.Slider(1, lim.max_images, value=4, step=1, label="Images", elem_id="num_images")
                with gr.Row():
                    guidance = gr.Slider(0, lim.max_guidance, value=7.5, step=0.5, label="Guidance")
                    sample_steps = gr.Slider(1, lim.max_sample_steps, value=25, step=1, label="Sampling steps",
                                             elem_id="sample_steps")
                dual_path = gr.Checkbox(True, label="Dual path (off = as the diffusers export)")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                gallery = gr.Gallery(label="Results", columns=4, format="png", elem_id="gallery", height=300,
                                     object_fit="contain")

        run_personalise = personalise.click(
            on_personalise, [image, steps, state], [summary, concept_zip, diffusers_zip, concept],
            api_name="personalise", concurrency_id=MODEL, preprocess=False)
        run_generate = generate.click(
            on_generate, [concept, prompt, seed, num_images, guidance, dual_path, sample_steps, state],
            [gallery], api_name="generate", concurrency_id=MODEL)
        # Not queued, so it runs while the model is busy: it sets the session's Stop flag (the
        # run ends at its next step) and drops the session's queued requests.
        stop.click(on_stop, [state], None, queue=False, cancels=[run_personalise, run_generate],
                   api_name="stop")
    return page
