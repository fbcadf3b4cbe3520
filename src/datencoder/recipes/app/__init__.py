"""``datencoder app [--base ...] [--encoder DIR] [--device cpu] [--host 127.0.0.1] [--port 7860]``.

A local web page (Gradio, the ``app`` extra) to personalise and generate in the browser. The
base model and encoder are loaded once; requests run one at a time through a queue. All files
go to one temporary folder (uploads, concepts, exports, gradio's cache), removed on exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import tempfile
import time
from pathlib import Path

from ...errors import DatencoderError

HELP_HOST = "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page to the network)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...system import DEFAULT_ENCODER

    parser.add_argument("--encoder", default=DEFAULT_ENCODER, metavar="DIR",
                        help=f"encoder folder, or the shipped {DEFAULT_ENCODER} (default)")
    parser.add_argument("--base", default=None, metavar="PATH_OR_ID",
                        help="base model (default: the one the encoder was trained on)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--host", default="127.0.0.1", help=HELP_HOST)
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")


def load_system(encoder: str | Path, base: str | None = None, device: str = "cpu"):
    """The encoder system on ``device``, its base model loaded once (``--base`` or the encoder's)."""
    import torch

    from ...base import load_base
    from ...io import read_json
    from ...system import EncoderSystem, resolve_encoder

    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise DatencoderError(f"--device {device!r} is not a torch device; use cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DatencoderError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    encoder = resolve_encoder(encoder)
    model = read_json(encoder / "encoder.json", "encoder").get("config", {}).get("model", {})
    base_model = load_base(base or model.get("pretrained"), model.get("image_tower"),
                           revision=None if base else model.get("revision"), device=device)
    system = EncoderSystem.load(encoder, base_model)
    system.encoder.to(device)
    return system


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the app like Ctrl-C: through the cleanup below


def run(args: argparse.Namespace) -> int:
    from ..demo import DEMO_DIR, PROMPTS

    if not 1 <= args.port <= 65535:
        raise DatencoderError(f"--port must be from 1 to 65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise DatencoderError("the app needs gradio: pip install \"datencoder[app]\" "
                              "(in a source checkout: pip install -e \".[app]\")")
    system = load_system(args.encoder, args.base, args.device)

    folder = Path(tempfile.mkdtemp(prefix="datencoder-app-"))
    uploads = folder / "gradio"
    # gradio keeps uploads and results in GRADIO_TEMP_DIR (read when gradio is imported and when
    # the page is built) and large request bodies spill to the tempfile folder: both go here.
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    tempfile.tempdir = str(folder)
    signal.signal(signal.SIGTERM, _terminate)
    page = studio = None
    try:
        import gradio as gr

        from .service import Studio
        from .ui import build

        studio = Studio(system, folder, uploads)
        page = build(studio, sorted(DEMO_DIR.glob("*.png")), PROMPTS)
        page.queue(default_concurrency_limit=1, max_size=32)
        # system fonts: the page must not fetch anything from the internet
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])
        try:
            page.launch(server_name=args.host, server_port=args.port, share=False, prevent_thread_lock=True,
                        max_file_size=f"{studio.limits.max_upload_mb}mb", allowed_paths=[str(DEMO_DIR)],
                        enable_monitoring=False, ssr_mode=False, quiet=True, theme=theme, footer_links=["api"],
                        # gradio probes the page with a 3 s HEAD request and, on a timeout (a busy
                        # machine rendering the page for the first time), demands a public share
                        # link; this app never shares, so the probe is skipped
                        _frontend=False)
        except OSError as err:
            raise DatencoderError(f"cannot serve on {args.host}:{args.port} ({str(err).splitlines()[0]}); "
                                  "pick another --port") from None
        print(f"datencoder app: serving on http://{args.host}:{args.port} (temporary files in {folder}); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if studio is not None:
            studio.shutdown()
        if page is not None:
            page.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        print("datencoder app: stopped, temporary files removed", flush=True)
    return 0
