"""`datencoder app`: the studio's checks in-process (tiny model), then the real server on the
embedded default through gradio_client, then one real page in headless Chromium."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datencoder.base import load_base
from datencoder.config import Config, from_dict
from datencoder.errors import DatencoderError
from datencoder.recipes.app.service import Studio
from datencoder.recipes.demo import DEMO_DIR
from datencoder.system import DEFAULT_ENCODER_DIR, EncoderSystem

APPLE = DEMO_DIR / "red_apple.png"


# --- the studio in-process, on the tiny model ---------------------------------------------------

@pytest.fixture(scope="module")
def studio(tiny_base_dir, tmp_path_factory):
    cfg = from_dict(Config, {"model": {"pretrained": str(tiny_base_dir)},
                             "encoder": {"tower_layers": [-1, -2], "hidden_dim": 32}, "tune": {"batch_size": 2}})
    folder = tmp_path_factory.mktemp("studio")
    (folder / "uploads").mkdir()
    return Studio(EncoderSystem(load_base(str(tiny_base_dir)), cfg), folder, folder / "uploads")


def _upload(studio, source: Path, name: str | None = None) -> Path:
    target = studio.upload_root / (name or source.name)
    shutil.copy(source, target)
    return target


def test_studio_personalises_saves_exports_and_generates(studio):
    session = studio.new_session()
    seen = []
    result = studio.personalize(session, _upload(studio, APPLE), 2, progress=lambda f, d: seen.append((f, d)))
    assert [d for _, d in seen] == ["encoder prediction", "tuning step 1/2", "tuning step 2/2"]
    assert result.label.startswith("1: red_apple (2 steps") and list(session.concepts) == [result.label]
    assert {"concept.json", "concept.safetensors"} <= set(zipfile.ZipFile(result.concept_zip).namelist())
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors"} <= set(
        zipfile.ZipFile(result.diffusers_zip).namelist())
    images = studio.generate(session, result.label, "S*, on a blue background", seed=3, num_images=2,
                             sample_steps=2)
    assert len(images) == 2 and images[0].size == (studio.system.base.resolution,) * 2
    assert all(p.is_relative_to(studio.folder) for p in session.folder.rglob("*"))
    studio.close_session(session)
    assert not session.folder.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "a photo on the beach"}, r"does not contain S\*; write e\.g\."),
    ({"prompt": "   "}, r"the prompt is empty"),
    ({"prompt": "S* " + "x" * 400}, r"more than 300"),
    ({"num_images": 0}, r"number of images must be from 1 to 8, got 0"),
    ({"num_images": 2.5}, r"number of images must be a whole number from 1 to 8"),
    ({"seed": -1}, r"seed must be from 0 to"),
    ({"guidance": 99}, r"guidance must be a number from 0 to 20, got 99"),
    ({"sample_steps": 101}, r"sampling steps must be from 1 to 100"),
])
def test_generation_checks_are_one_line_and_come_first(studio, kwargs, message):
    args = {"prompt": "S*", "seed": 0, "num_images": 1, "guidance": 7.5, "sample_steps": 1, **kwargs}
    with pytest.raises(DatencoderError, match=message):
        studio.generate(studio.new_session(), None, **args)  # checked before "no concept yet"


def test_personalise_refuses_bad_uploads(studio, tmp_path):
    session = studio.new_session()
    with pytest.raises(DatencoderError, match=r"tuning steps must be from 0 to 50, got 51"):
        studio.personalize(session, _upload(studio, APPLE), 51)
    with pytest.raises(DatencoderError, match=r"no image: upload one or pick a bundled example"):
        studio.personalize(session, None, 2)
    outside = tmp_path / "secret.png"
    shutil.copy(APPLE, outside)  # a real image, but not one the server received
    with pytest.raises(DatencoderError, match=r"secret\.png is not an uploaded file"):
        studio.personalize(session, outside, 2)
    with pytest.raises(DatencoderError, match=r"passwd is not an uploaded file"):
        studio.personalize(session, studio.upload_root / ".." / ".." / "etc" / "passwd", 2)
    text = studio.upload_root / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(DatencoderError, match=r"^my notes\.png is not a readable image"):  # the user's name
        studio.personalize(session, text, 2, name="my notes.png")
    big = studio.upload_root / "big.png"
    Image.new("RGB", (5000, 4000)).save(big)  # 20 megapixels, a few kB
    with pytest.raises(DatencoderError, match=r"big\.png is 5000x4000 pixels, more than the limit of 16\.0 megapixels"):
        studio.personalize(session, big, 2)
    heavy = studio.upload_root / "heavy.png"
    heavy.write_bytes(os.urandom(11 * 2**20))
    with pytest.raises(DatencoderError, match=r"heavy\.png is 11\.0 MB, more than the limit of 10 MB"):
        studio.personalize(session, heavy, 2)
    assert session.concepts == {}
    with pytest.raises(DatencoderError, match=r"no concept yet: press Personalise first"):
        studio.generate(session, None, "S*", num_images=1, sample_steps=1)


def test_stop_ends_the_run_at_the_next_step(studio):
    session = studio.new_session()
    studio.stop(session)  # pressed before the run: cleared when the run starts
    steps = []

    def press_stop_after_one_step(fraction, desc):
        steps.append(desc)
        if desc == "tuning step 1/50":
            studio.stop(session)

    with pytest.raises(DatencoderError, match=r"stopped; nothing was kept"):
        studio.personalize(session, _upload(studio, APPLE), 50, progress=press_stop_after_one_step)
    assert steps == ["encoder prediction", "tuning step 1/50"] and session.concepts == {}
    assert studio.personalize(session, _upload(studio, APPLE), 0).label.startswith("1: red_apple (0 steps")


# --- the real server on the embedded default, through gradio_client ------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("gradio_client", reason="the app extra is not installed (pip install -e '.[app]')")
    if not (DEFAULT_ENCODER_DIR / "encoder.json").exists():
        pytest.skip("the embedded encoder is not shipped in this checkout")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "datencoder.recipes.cli", "app", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log, deadline, folder = [], time.monotonic() + 240, None
    while folder is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            log.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        if match := re.search(r"serving on http://127\.0\.0\.1:\d+ \(temporary files in (.+?)\)", log[-1]):
            folder = Path(match.group(1))
    if folder is None:
        proc.kill()
        pytest.fail("the app did not start:\n" + "".join(log)[-3000:])
    yield f"http://127.0.0.1:{port}/", folder
    proc.send_signal(signal.SIGTERM)  # as a service manager stops it: the temporary folder goes too
    code = proc.wait(timeout=60)
    while not lines.empty():
        log.append(lines.get())
    assert code == 0, "".join(log)[-3000:]
    assert not folder.exists(), "the app left its temporary folder behind"


def _client(server, tmp_path):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(tmp_path))


def test_api_personalise_then_generate_equals_the_library(server, tmp_path):
    from gradio_client import handle_file

    from datencoder.concept import Concept
    from datencoder.pipeline import ConceptPipeline

    client = _client(server, tmp_path)
    summary, concept_zip, diffusers_zip, pick = client.predict(handle_file(APPLE), 2, api_name="/personalise")
    assert re.fullmatch(r"nearest word \*\*.+\*\* · encoder [\d.]+ s · tuning [\d.]+ s \(2 steps\)", summary)
    assert Path(concept_zip).parent.is_relative_to(tmp_path)  # downloaded by the client
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.txt"} <= set(
        zipfile.ZipFile(diffusers_zip).namelist())
    zipfile.ZipFile(concept_zip).extractall(tmp_path / "concept")
    gallery = client.predict(pick["value"], "S*, small, top left", 5, 1, 7.5, True, 4, api_name="/generate")
    assert len(gallery) == 1
    served = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=np.int16)
    concept = Concept.load(tmp_path / "concept")
    assert concept.info["image"] == "red_apple.png"  # the upload's name, never a server path
    # the page's image is the library's, from the downloaded concept with the same settings
    # on the base the concept records (the shipped encoders' base, minisd-emoji-v1)
    library = ConceptPipeline(load_base(concept.base["name"], with_image_tower=False), concept)(
        "S*, small, top left", num_images_per_prompt=1, num_inference_steps=4, guidance_scale=7.5, seed=5).images[0]
    library = np.asarray(library, dtype=np.int16)
    assert served.ndim == 3 and served.shape == library.shape  # one image each, not broadcast against a list
    assert np.abs(served - library).max() <= 1


def test_api_errors_are_readable_and_sessions_are_separate(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    first, second = _client(server, tmp_path), _client(server, tmp_path)
    _, _, _, pick = first.predict(handle_file(APPLE), 0, api_name="/personalise")
    with pytest.raises(AppError, match=r"no concept yet: press Personalise first"):
        second.predict(None, "S*", 0, 1, 7.5, True, 2, api_name="/generate")
    with pytest.raises(AppError, match=r"not in the list of choices"):  # the other session's concept
        second.predict(pick["value"], "S*", 0, 1, 7.5, True, 2, api_name="/generate")
    with pytest.raises(AppError, match=r"does not contain S\*"):
        first.predict(pick["value"], "a red apple", 0, 1, 7.5, True, 2, api_name="/generate")
    with pytest.raises(AppError, match=r"tuning steps must be from 0 to 50, got 99"):
        first.predict(handle_file(APPLE), 99, api_name="/personalise")
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(AppError, match=r"^notes\.png is not a readable image"):
        first.predict(handle_file(notes), 2, api_name="/personalise")
    # a server path named by the client (gradio_client would upload its own copy, so plain HTTP)
    import httpx

    event = httpx.post(f"{server[0]}gradio_api/call/personalise", json={"data": [
        {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, 2]}).json()["event_id"]
    reply = httpx.get(f"{server[0]}gradio_api/call/personalise/{event}", timeout=60).text
    assert "event: error" in reply and "root:" not in reply


def test_api_stop_cancels_a_long_run(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    client = _client(server, tmp_path)
    job = client.submit(handle_file(APPLE), 50, api_name="/personalise")
    deadline = time.monotonic() + 60
    while job.status().code != Status.PROGRESS and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until the run reports its first step
    client.predict(api_name="/stop")
    with pytest.raises(AppError, match=r"stopped; nothing was kept from this run"):
        job.result(timeout=120)
    _, _, _, pick = client.predict(handle_file(APPLE), 0, api_name="/personalise")
    assert pick["value"].startswith("1: red_apple (0 steps")  # nothing kept from the stopped run


# --- one real page in headless Chromium ------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1250",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # nothing but this machine
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="chromium or chromedriver not installed")
def test_browser_upload_personalise_generate(server, tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[app]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # DATENCODER_APP_SCREENSHOT=docs/images/app.png makes the README's picture: default settings
    shot = os.environ.get("DATENCODER_APP_SCREENSHOT")
    steps, images = (12, 4) if shot else (2, 1)
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 600)  # generous: a busy CI machine
        driver.get(server[0])
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(APPLE))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        _set_number(driver, "steps", steps)
        _set_number(driver, "num_images", images)
        driver.find_element(By.CSS_SELECTOR, "#personalise").click()
        wait.until(lambda d: "nearest word" in d.find_element(By.ID, "summary").text)
        assert f"({steps} steps)" in driver.find_element(By.ID, "summary").text
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def shown(d):
            found = d.find_elements(By.CSS_SELECTOR, "#gallery img")
            return len(found) >= images and all(d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", im) for im in found)
        wait.until(shown)
        time.sleep(0.5)  # let the gallery finish its layout before the picture
        driver.save_screenshot(str(tmp_path / "app.png"))
        if shot:
            driver.save_screenshot(shot)
    finally:
        driver.quit()
    assert Image.open(tmp_path / "app.png").size[0] > 0
