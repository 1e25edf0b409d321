"""app.py, the grounding page (README, "Grounding page"): through gradio's client its boxes are predict.py's,
bad input is answered on the page while the server keeps serving, the masks checkbox draws each mask, a checkpoint
that fails to load stops it at start, and headless Chromium grounds an example and an upload.

These tests need the app's extra requirements (gradio, playwright) and Debian's chromium; without them they are
skipped, unless HIVG_REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure.
"""
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from datasets.synthetic import generate
from tests.conftest import REPO
from utils.visualize import PALETTE

REQUIRED = os.environ.get("HIVG_REQUIRE_BROWSER") == "1"
HOW = "pip install -r requirements-app.txt; apt-get install chromium"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 180


def missing(what: str):
    """Skip, saying how to install `what`; a failure under HIVG_REQUIRE_BROWSER=1."""
    message = f"needs {what}: {HOW}"
    if REQUIRED:
        pytest.fail(f"HIVG_REQUIRE_BROWSER=1 and this test {message}")
    pytest.skip(message)


def need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} ({e})")


def app(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "app.py", *map(str, args)], cwd=REPO, text=True, **kw)


@pytest.fixture(scope="module")
def examples(synthetic_set):
    """A small synthetic set: its folder and its test split's (image path, expression) pairs."""
    folder = synthetic_set(1, 1, 4)
    samples = torch.load(folder / "synthref" / "synthref_test.pth", weights_only=True)
    return folder, [(folder / "synthref" / "images" / s[0], s[3]) for s in samples]


@pytest.fixture(scope="module")
def server(tiny_seg, examples, tmp_path_factory):
    """The page on a free local port, serving the tiny checkpoint with the segmentation head; its URL."""
    need("gradio_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = app("--checkpoint", tiny_seg[0], "--device", "cpu", "--port", port, "--examples", examples[0],
               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            log.seek(0)
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read()}"
            assert time.monotonic() < deadline, f"app.py did not serve within {START_TIMEOUT}s:\n{log.read()}"
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0, "app.py did not stop cleanly on SIGTERM"
    finally:
        proc.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)


def ground(client, image, text, heatmap=False, *masks):
    """(picture path, heat gallery, boxes list, message) of one request through the page's API (`masks`: the
    checkbox, left out as scripts written before it did)."""
    from gradio_client import handle_file
    picture, heat, boxes, message = client.predict(handle_file(str(image)), text, heatmap, *masks,
                                                   api_name="/ground")
    return picture, heat, json.loads(boxes) if boxes else [], message


def predict_boxes(checkpoint, image, texts, tmp_path, capsys):
    argv = ["--checkpoint", str(checkpoint), "--device", "cpu", "--image", str(image), "--out",
            str(tmp_path / "predict.png")]
    assert predict.main(argv + [a for t in texts for a in ("--text", t)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_same_boxes(page, expected):
    # Both are rounded to 0.01 px; the server is another process, whose thread count may differ.
    assert [b["text"] for b in page] == [e["text"] for e in expected]
    for b, e in zip(page, expected):
        assert b["box_xyxy"] == pytest.approx(e["box_xyxy"], abs=0.0101), (b, e)
        assert b["score"] == pytest.approx(e["score"], abs=1e-4)


@pytest.mark.recorded
def test_api_boxes_are_predict_py_boxes(client, tiny_seg, examples, tmp_path, capsys):
    (image, first), (_, second) = examples[1][:2]
    picture, heat, boxes, message = ground(client, image, f"{first}\n\n  {second}  \n", heatmap=True)
    assert message == ""
    assert_same_boxes(boxes, predict_boxes(tiny_seg[0], image, [first, second], tmp_path, capsys))
    w, h = Image.open(image).size
    k = -(-640 // max(w, h))                         # small images are drawn enlarged, at least 640 px
    drawn = Image.open(picture)
    assert drawn.width == k * w and drawn.height > k * h      # the expressions in a strip below the image
    assert [item["caption"] for item in heat] == [first, second]
    assert all(Image.open(item["image"]).width == k * w for item in heat)


def test_bad_input_is_answered_on_the_page(client, tiny_seg, examples, tmp_path, capsys):
    image, text = examples[1][0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (10000, 9000)).save(huge)          # 90 M pixels, a small file
    cases = [(not_image, text, "not an image this page can read"),
             (image, " \n\n", "Type a referring expression"),
             (image, "\n".join(["the red circle"] * 9), "at most 8"),
             (image, "the red circle " * 30, "over this model's 77-token limit"),
             (huge, text, "over the page's limit of 89 M")]
    for upload, expressions, expected in cases:
        picture, heat, boxes, message = ground(client, upload, expressions)
        assert expected in message and (picture, heat, boxes) == (None, [], []), (expected, message)
    # A wide image is downscaled to 4096 px, its boxes given in pixels of the original; the server still serves.
    wide = tmp_path / "wide.png"
    Image.open(image).convert("RGB").resize((8192, 512)).save(wide)
    picture, _, boxes, message = ground(client, wide, text)
    assert "downscaled to 4096x256" in message
    assert Image.open(picture).width == 4096 and Image.open(picture).height > 256     # the caption below
    expected = predict_boxes(tiny_seg[0], wide, [text], tmp_path, capsys)
    assert boxes[0]["box_xyxy"] == pytest.approx(expected[0]["box_xyxy"], abs=0.5)


def test_masks_checkbox_overlays_each_mask_in_its_box_colour(client, examples):
    (image, first), (_, second) = examples[1][:2]
    texts = f"{first}\n{second}"
    plain, _, boxes, _ = ground(client, image, texts, False, False)
    masked, _, masked_boxes, message = ground(client, image, texts, False, True)
    assert message == "" and masked_boxes == boxes
    before, after = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (plain, masked))
    changed = (before != after).any(-1)
    k = -(-640 // max(Image.open(image).size))             # drawn enlarged by k
    h = Image.open(image).height * k
    assert changed[:h].any() and not changed[h:].any()      # over the image, never over the captions
    # every changed pixel is the picture blended half-way with the first box's colour, the second's, or both
    first_colour, second_colour = (np.array(c, dtype=np.float64) for c in PALETTE[:2])
    under = before[changed]
    blends = [np.abs(after[changed] - expected).max(-1) <= tol for expected, tol in
              [((under + first_colour) / 2, 0.5), ((under + second_colour) / 2, 0.5),
               (((under + first_colour) / 2 + second_colour) / 2, 0.75)]]
    assert (blends[0] | blends[1] | blends[2]).all() and blends[0].any() and blends[1].any()


def test_masks_from_a_model_without_the_segmentation_head_get_a_message(grounder, examples):
    from app import ground as page_ground

    image, text = examples[1][0]
    picture, heat, boxes, message = page_ground(grounder, str(image), text, heatmap=False, masks=True)
    assert (picture, heat, boxes) == (None, [], "")
    assert "trained without the segmentation head (--use_mask_loss)" in message and "Untick masks" in message


def test_a_checkpoint_that_fails_to_load_stops_the_server(tmp_path):
    need("gradio")
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = app("--checkpoint", bad, "--port", "9", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.startswith(f"app.py: error: --checkpoint {bad} is not a PyTorch or safetensors file"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err + out


def test_a_port_out_of_range_is_one_line(tiny):
    proc = app("--checkpoint", tiny[0], "--device", "cpu", "--port", "-1", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "Traceback" not in out + err
    assert err == "app.py: error: --port -1 is not a port number: give one in 1-65535 (default 7860)\n", err


def test_an_examples_file_refused_unread_names_the_apps_own_flag(tmp_path):
    from app import example_rows
    from tests.conftest import Payload
    from utils.errors import UserError

    generate(str(tmp_path), num_train=1, num_val=1, num_test=1, imsize=64)
    split = tmp_path / "synthref" / "synthref_test.pth"
    torch.save([Payload(tmp_path / "ran")], split)
    with pytest.raises(UserError) as refused:
        example_rows(tmp_path, str(tmp_path / "scratch"))
    message = str(refused.value)
    assert message.startswith(f"--examples {tmp_path}: the examples file {split} holds objects besides plain types")
    assert "--allow_unsafe_pickle" not in message and "--examples DIR" in message
    assert not (tmp_path / "ran").exists()


def test_browser_grounds_an_example_and_an_upload(server, tiny_seg, examples, tmp_path, capsys):
    sync_api = need("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"Chromium at {CHROMIUM}")
    (example, example_text), (image, text) = examples[1][0], examples[1][2]
    expected = predict_boxes(tiny_seg[0], example, [example_text], tmp_path, capsys)
    expected += predict_boxes(tiny_seg[0], image, [text], tmp_path, capsys)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            page.get_by_text(example_text, exact=True).click()            # an example fills the inputs
            sync_api.expect(page.locator("#text textarea")).to_have_value(example_text)
            shown = [submit_and_read(page)]
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#text textarea").fill(text)
            page.locator("#masks input").check()                         # the masks do not move the boxes
            shown.append(submit_and_read(page))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {tmp_path / 'page.png'}")
    assert_same_boxes([b for s in shown for b in s], expected)


def submit_and_read(page):
    """Click Ground, wait for the boxes of the current expression, return the page's JSON."""
    text = page.locator("#text textarea").input_value()
    page.locator("#ground").click()
    code = page.locator("#boxes .cm-content")
    code.filter(has_text=json.dumps(text)).wait_for(timeout=60_000)
    assert page.locator("#picture img").count() == 1
    return json.loads(code.inner_text())
