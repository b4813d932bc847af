"""Explain over HTTP and the explanation page: a real server, urllib, and headless Chromium.

The browser test (on a trained model whose explainer offers every method) first explains the
blank canvas and reads the warnings the page shows, then draws a digit with real pointer events,
picks a method other than Grad-CAM, presses Explain, reads the prediction and the method the page
names, checks them against the server's answer for the same picture, and saves a screenshot that
must not be blank (Debian's chromium and chromium-driver, selenium; `make tools` installs them).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import service.explain.pipeline
from tests.support.harness import ServerThread, running_server
from tests.support.onnx_models import write_test_repository

MODEL = "classifier"
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_repository(tmp_path_factory.mktemp("explain_repository"), broken=False)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, http_port=0) as thread:
        yield thread


@pytest.fixture(scope="module")
def methods_server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository, http_port=0) as thread:
        yield thread


def digit_png() -> bytes:
    picture = np.zeros((28, 28), np.uint8)
    picture[4:24, 13:16] = 255  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return buffer.getvalue()


def post(
    server: ServerThread, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(server.http_url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def test_explain_answers_json_with_predictions_heatmaps_and_overlays(server: ServerThread) -> None:
    status, kind, body = post(
        server, f"/v2/models/{MODEL}/explain?top_k=3", digit_png(), {"Content-Type": "image/png"}
    )
    assert status == 200 and kind == "application/json", body[:300]
    answer = json.loads(body)
    assert answer["model_name"] == MODEL and answer["model_version"] == "1"
    predictions = answer["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["probability"] >= predictions[1]["probability"]
    assert predictions[0]["label"] == f"digit_{predictions[0]['class_index']}"
    assert len(answer["explanations"]) == 3
    first = answer["explanations"][0]
    assert first["target"] == predictions[0]
    assert first["heatmap"]["shape"] == [28, 28] and len(first["heatmap"]["data"]) == 784
    overlay = Image.open(io.BytesIO(base64.b64decode(first["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size[0] >= 28


def test_explain_takes_base64_json_and_answers_the_overlay_as_png(server: ServerThread) -> None:
    document = {"image": base64.b64encode(digit_png()).decode(), "target_classes": [3]}
    status, _, body = post(
        server,
        f"/v2/models/{MODEL}/explain",
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, body[:300]
    answer = json.loads(body)
    assert [e["target"]["class_index"] for e in answer["explanations"]] == [3]
    status, kind, body = post(
        server, f"/v2/models/{MODEL}/explain", digit_png(), {"Accept": "image/png"}
    )
    assert status == 200 and kind == "image/png"
    assert Image.open(io.BytesIO(body)).format == "PNG"


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    [
        (f"/v2/models/{MODEL}/explain", b"not a picture", {}, 400),
        (
            f"/v2/models/{MODEL}/explain",
            b'{"image": "%%%"}',
            {"Content-Type": "application/json"},
            400,
        ),
        (f"/v2/models/{MODEL}/explain?top_k=many", b"x", {}, 400),
        (f"/v2/models/{MODEL}/explain?polarity=sideways", b"x", {}, 400),
        (f"/v2/models/{MODEL}/explain?top_k=500", b"x", {}, 400),
        (f"/v2/models/{MODEL}/explain?method=hirescam", digit_png(), {}, 400),
        (f"/v2/models/{MODEL}/explain?ig_steps=500", digit_png(), {}, 400),
        (f"/v2/models/{MODEL}/explain?heatmap_scale=sideways", digit_png(), {}, 400),
        ("/v2/models/nope/explain", b"x", {}, 404),
    ],
)
def test_bad_explain_requests_get_an_error(
    server: ServerThread, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    got, _, answer = post(server, path, body, headers)
    assert got == status and json.loads(answer)["error"]


def test_the_page_can_be_turned_off_and_sits_behind_tokens(
    repository: Path, tmp_path: Path
) -> None:
    with running_server(repository, http_port=0, http_ui=False) as server:
        with pytest.raises(urllib.error.HTTPError) as off:
            urllib.request.urlopen(server.http_url + "/", timeout=10)
        assert off.value.code == 404
    token = "page-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    with running_server(repository, http_port=0, auth_token_file=tmp_path / "tokens") as server:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.http_url + "/", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            server.http_url + "/", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as page:
            assert b"<canvas" in page.read()


def test_the_page_draws_a_digit_and_shows_the_prediction(
    methods_server: ServerThread, tmp_path: Path
) -> None:
    if not CHROMEDRIVER.exists() or shutil.which("chromium") is None:
        pytest.fail("chromium and chromium-driver are missing: `make tools` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server, model, method = methods_server, "mnist_cnn", "hirescam"

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1000,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(server.http_url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
        Select(driver.find_element(By.ID, "model")).select_by_value(model)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#method option[value='{method}']"))
        # the blank canvas first: the page shows the server's warnings about the picture
        blank = driver.execute_script(
            "return document.getElementById('canvas').toDataURL('image/png')"
        )
        driver.find_element(By.ID, "explain").click()
        wait.until(
            expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Prediction:")
        )
        blank_warnings = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#warnings li")]
        assert driver.find_element(By.ID, "method-name").text == "Grad-CAM"
        canvas = driver.find_element(By.ID, "canvas")
        # a "1": one stroke down the middle of the 280x280 canvas (offsets from its centre)
        ActionChains(driver).move_to_element_with_offset(
            canvas, 0, -100
        ).click_and_hold().move_by_offset(0, 50).move_by_offset(0, 50).move_by_offset(
            0, 50
        ).move_by_offset(0, 50).release().perform()
        drawn = driver.execute_script(
            "return document.getElementById('canvas').toDataURL('image/png')"
        )
        Select(driver.find_element(By.ID, "method")).select_by_value(method)
        driver.find_element(By.ID, "explain").click()
        named = driver.find_element(By.ID, "method-name")
        wait.until(lambda d: named.get_attribute("data-method") == method)
        shown = driver.find_element(By.ID, "status").text.removeprefix("Prediction:").strip()
        shown_method = named.text
        drawn_warnings = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#warnings li")]
        rows = driver.find_elements(By.CSS_SELECTOR, "#predictions li")
        wait.until(
            lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") > 0
        )
        screenshot = tmp_path / "http_page.png"
        assert driver.save_screenshot(str(screenshot))
        script_errors = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["source"] == "javascript"
        ]
    finally:
        driver.quit()
    assert not script_errors, script_errors
    assert len(rows) == 3
    # the page shows what the server says about the very pictures it sent
    status, _, body = post(server, f"/v2/models/{model}/explain", data_url_bytes(blank))
    assert status == 200
    warned = json.loads(body)["warnings"]
    assert any("blank" in w for w in warned) and blank_warnings == warned
    picture = data_url_bytes(drawn)
    status, _, body = post(server, f"/v2/models/{model}/explain?top_k=3&method={method}", picture)
    assert status == 200
    answer = json.loads(body)
    assert shown == answer["predictions"][0]["label"]
    assert answer["method"] == method and shown_method == "HiResCAM"
    assert drawn_warnings == answer["warnings"]
    ink = np.asarray(Image.open(io.BytesIO(picture)).convert("L"))
    assert (ink > 128).sum() > 500, "the stroke reached the canvas"
    # the screenshot is a page, not a blank: many colours, the dark canvas and the light page
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50
    assert shot.min() < 40 and shot.max() > 200


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 data: URL (what canvas.toDataURL gives)."""
    return base64.b64decode(url.split(",", 1)[1])


def test_explain_honours_the_client_timeout(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The picture's decoding takes 0.6 s: a 0.2 s timeout (microseconds, as infer's) expires
    # inside it, in the query string or in the JSON body's parameters, and answers 503 as an
    # expired infer does; without a timeout, or with a long one, the same request succeeds.
    original = service.explain.pipeline.decode_image

    def slow(*args: Any) -> Any:
        time.sleep(0.6)
        return original(*args)

    monkeypatch.setattr(service.explain.pipeline, "decode_image", slow)
    path = f"/v2/models/{MODEL}/explain"
    document = {"image": base64.b64encode(digit_png()).decode(), "parameters": {"timeout": 200000}}
    for got in (
        post(server, path + "?timeout=200000", digit_png()),
        post(server, path, json.dumps(document).encode(), {"Content-Type": "application/json"}),
    ):
        status, _, body = got
        assert status == 503, body[:300]
        assert "deadline" in json.loads(body)["error"].lower()
    for query in ("", "?timeout=30000000"):
        status, _, body = post(server, path + query, digit_png())
        assert status == 200, body[:300]
    for bad in ("0", "-5", "soon", "nan"):
        status, _, body = post(server, f"{path}?timeout={bad}", digit_png())
        assert status == 400 and "timeout" in json.loads(body)["error"]
