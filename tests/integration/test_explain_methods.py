"""Every explanation method served: the explain API's `method` and `ig_steps` over gRPC and
HTTP, ModelInfer's `method` parameter, and the client's `--method` and `--ig-steps`.

The served maps are compared with the same folder's graphs run directly (export.gradcam.run),
which tests/export/test_methods.py holds to pytorch-grad-cam and Captum; the HTTP front's with
the gRPC explain API's for the same picture.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import modelrepo
from export.gradcam.run import MethodRunner
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from tests.support.harness import ServerThread, infer_request, running_server, stub
from training.mnist import load_mnist

EXPLAINER = "mnist_cnn_gradcam"


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository, http_port=0) as thread:
        yield thread


@pytest.fixture(scope="module")
def runner(mnist_repository: Path) -> MethodRunner:
    folder = max((mnist_repository / EXPLAINER).iterdir(), key=lambda p: p.name.isdigit())
    return MethodRunner(folder)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = load_mnist("test")
    return images[:6].astype(np.float32)[:, None] / 255.0


def _infer(
    server: ServerThread, pixels: np.ndarray, targets: np.ndarray, **parameters: object
) -> dict[str, np.ndarray]:
    request = infer_request(
        EXPLAINER, pixels, extra_inputs={"target_class": targets.reshape(-1, 1).astype(np.int64)}
    )
    for name, value in parameters.items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
        else:
            request.parameters[name].int64_param = int(value)  # type: ignore[call-overload]
    with server.channel() as channel:
        response = stub(channel).ModelInfer(request, timeout=120)
    return {
        out.name: np.frombuffer(
            raw, dtype=np.int64 if out.datatype == "INT64" else np.float32
        ).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_the_explainer_config_lists_its_methods(server: ServerThread) -> None:
    with server.channel() as channel:
        config = stub(channel).ModelConfig(pb.ModelConfigRequest(name=EXPLAINER)).config
    listed = config.parameters[modelrepo.METHODS].string_value.split(",")
    assert listed == list(modelrepo.ALL_METHODS)


@pytest.mark.parametrize(
    "method", ["hirescam", "gradcam_plusplus", "eigencam", "scorecam", "ablationcam", "saliency"]
)
def test_model_infer_method_parameter(
    server: ServerThread, runner: MethodRunner, digits: np.ndarray, method: str
) -> None:
    targets = np.array([-1, 3, 7, -1], dtype=np.int64)
    served = _infer(server, digits[:4], targets, method=method)
    local = runner.explain(method, digits[:4], targets)
    np.testing.assert_allclose(served[modelrepo.CAM], local[modelrepo.CAM], atol=1e-5)
    np.testing.assert_allclose(served[modelrepo.CAM_RAW], local[modelrepo.CAM_RAW], rtol=1e-5)
    plain = _infer(server, digits[:4], targets)
    assert not np.allclose(plain[modelrepo.CAM], served[modelrepo.CAM], atol=1e-3)


def test_model_infer_integrated_gradients_with_steps(
    server: ServerThread, runner: MethodRunner, digits: np.ndarray
) -> None:
    targets = np.array([-1, 2], dtype=np.int64)
    served = _infer(server, digits[:2], targets, method="integrated_gradients", ig_steps=8)
    local = runner.explain("integrated_gradients", digits[:2], targets, steps=8)
    np.testing.assert_allclose(served[modelrepo.CAM], local[modelrepo.CAM], atol=1e-5)


@pytest.mark.parametrize(
    ("model", "parameters", "message"),
    [
        (EXPLAINER, {"method": "fullgrad"}, "'fullgrad' is not offered"),
        (EXPLAINER, {"method": "integrated_gradients", "ig_steps": 0}, "ig_steps must be in"),
        (EXPLAINER, {"method": 3}, "takes a string"),
        ("mnist_cnn", {"method": "hirescam"}, "not offered"),
    ],
)
def test_model_infer_refuses_what_the_model_does_not_offer(
    server: ServerThread,
    digits: np.ndarray,
    model: str,
    parameters: dict[str, object],
    message: str,
) -> None:
    extra = {"target_class": np.array([[1]], dtype=np.int64)} if model == EXPLAINER else None
    request = infer_request(model, digits[:1], extra_inputs=extra)
    for name, value in parameters.items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
        else:
            request.parameters[name].int64_param = int(value)  # type: ignore[call-overload]
    with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        stub(channel).ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


def _explain(server: ServerThread, pixels: np.ndarray, **fields: object) -> ex.ExplainResponse:
    request = ex.ExplainRequest(
        model_name="mnist_cnn",
        tensor=ex.RawTensor(shape=[1, 28, 28], data=pixels.astype("<f4").tobytes()),
        **fields,  # type: ignore[arg-type]
    )
    with server.channel() as channel:
        return ex_grpc.ExplainerStub(channel).Explain(request, timeout=120)


@pytest.mark.parametrize(
    "method", ["", "gradcam", "layercam", "ablationcam", "integrated_gradients"]
)
def test_explain_api_method(
    server: ServerThread, runner: MethodRunner, digits: np.ndarray, method: str
) -> None:
    response = _explain(server, digits[1], method=method, top_k=2)
    classes = [e.target.class_index for e in response.explanations]
    assert len(classes) == 2
    local = runner.explain(method or "gradcam", np.repeat(digits[1:2], 2, 0), np.array(classes))
    for explanation, want in zip(response.explanations, local[modelrepo.CAM], strict=True):
        heatmap = np.frombuffer(explanation.heatmap, dtype="<f4").reshape(28, 28)
        np.testing.assert_allclose(heatmap, want, atol=1e-5)
        assert explanation.overlay_png.startswith(b"\x89PNG")


def test_explain_api_unknown_method(server: ServerThread, digits: np.ndarray) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _explain(server, digits[0], method="fullgrad")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "it offers gradcam, hirescam" in (err.value.details() or "")


def test_client_explain_method_all_draws_every_method(
    server: ServerThread, digits: np.ndarray, tmp_path: Path
) -> None:
    from PIL import Image

    from client.__main__ import main

    image = tmp_path / "digit.png"
    Image.fromarray((digits[2, 0] * 255).astype(np.uint8)).save(image)
    out = tmp_path / "sheet.png"
    argv = ["explain", str(image), "--method", "all", "--out", str(out), "--url", server.address]
    assert main(argv) == 0
    sheet = Image.open(out)
    tile = sheet.height - 14
    assert sheet.width == tile * len(modelrepo.ALL_METHODS)
    one = tmp_path / "one.png"
    argv = [
        "explain",
        str(image),
        "--method",
        "scorecam",
        "--out",
        str(one),
        "--url",
        server.address,
    ]
    assert main(argv) == 0
    assert one.read_bytes().startswith(b"\x89PNG")


def _heatmaps(response: ex.ExplainResponse) -> np.ndarray:
    return np.stack(
        [np.frombuffer(e.heatmap, dtype="<f4").reshape(28, 28) for e in response.explanations]
    )


def test_explain_api_integrated_gradients_steps(
    server: ServerThread, runner: MethodRunner, digits: np.ndarray
) -> None:
    method = "integrated_gradients"
    default = _explain(server, digits[3], method=method)
    eight = _explain(server, digits[3], method=method, ig_steps=8)
    assert (default.method, default.ig_steps) == (method, modelrepo.DEFAULT_IG_STEPS)
    assert (eight.method, eight.ig_steps) == (method, 8)
    explained = np.array([eight.explanations[0].target.class_index])
    local = runner.explain(method, digits[3:4], explained, steps=8)
    np.testing.assert_allclose(_heatmaps(eight), local[modelrepo.CAM], atol=1e-5)
    assert not np.allclose(_heatmaps(default), _heatmaps(eight), atol=1e-3)
    explicit = _explain(server, digits[3], method=method, ig_steps=modelrepo.DEFAULT_IG_STEPS)
    np.testing.assert_allclose(_heatmaps(explicit), _heatmaps(default), atol=1e-6)
    assert _explain(server, digits[3], method="hirescam").ig_steps == 0


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_explain_api_refuses_steps_out_of_bounds(
    server: ServerThread, digits: np.ndarray, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _explain(server, digits[0], method=method, ig_steps=500)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "ig_steps" in details and f"1 to {modelrepo.MAX_IG_STEPS}" in details
    assert "got 500" in details


# -- the same over HTTP -----------------------------------------------------------------------


def _digit_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((pixels[0] * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _post(
    server: ServerThread, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(server.http_url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def _http_explain(server: ServerThread, png: bytes, form: str, **fields: Any) -> dict[str, Any]:
    """One HTTP explain call, its options in the query string (`query`) or the JSON body."""
    path = "/v2/models/mnist_cnn/explain"
    if form == "query":
        query = urllib.parse.urlencode({k: str(v).lower() for k, v in fields.items()})
        status, _, body = _post(server, f"{path}?{query}", png, {"Content-Type": "image/png"})
    else:
        document = {"image": base64.b64encode(png).decode(), **fields}
        headers = {"Content-Type": "application/json"}
        status, _, body = _post(server, path, json.dumps(document).encode(), headers)
    assert status == 200, body[:300]
    answer: dict[str, Any] = json.loads(body)
    return answer


def _http_heatmaps(answer: dict[str, Any]) -> np.ndarray:
    maps = [e["heatmap"] for e in answer["explanations"]]
    return np.stack([np.asarray(m["data"], np.float32).reshape(m["shape"]) for m in maps])


@pytest.mark.parametrize(
    ("method", "form", "extra"),
    [
        ("hirescam", "query", {}),
        ("saliency", "json", {}),
        ("integrated_gradients", "query", {"ig_steps": 8}),
        ("integrated_gradients", "json", {"ig_steps": 8}),
    ],
)
def test_http_explain_method_matches_the_grpc_explain_api(
    server: ServerThread, digits: np.ndarray, method: str, form: str, extra: dict[str, Any]
) -> None:
    png = _digit_png(digits[4])
    answer = _http_explain(server, png, form, method=method, top_k=2, **extra)
    gradcam = _http_explain(server, png, form, top_k=2)
    request = ex.ExplainRequest(model_name="mnist_cnn", image=png, method=method, top_k=2, **extra)
    with server.channel() as channel:
        over_grpc = ex_grpc.ExplainerStub(channel).Explain(request, timeout=120)
    assert answer["method"] == method and gradcam["method"] == "gradcam"
    assert answer.get("ig_steps", 0) == extra.get("ig_steps", 0) == over_grpc.ig_steps
    classes = [e["target"]["class_index"] for e in answer["explanations"]]
    assert classes == [e.target.class_index for e in over_grpc.explanations]
    assert len(classes) == 2
    np.testing.assert_allclose(_http_heatmaps(answer), _heatmaps(over_grpc), atol=1e-6)
    assert not np.allclose(_http_heatmaps(answer), _http_heatmaps(gradcam), atol=1e-3)
    assert answer["warnings"] == list(over_grpc.warnings)
    assert answer["inverted"] is False and answer["heatmap_scale"] == "per_class"
    assert all("annotated_png" not in e for e in answer["explanations"])


def test_http_explain_annotated_and_shared_scale(server: ServerThread, digits: np.ndarray) -> None:
    from PIL import Image

    png = _digit_png(digits[5])
    answer = _http_explain(server, png, "json", annotated=True, heatmap_scale="shared", top_k=2)
    assert answer["heatmap_scale"] == "shared"
    annotated = [base64.b64decode(e["annotated_png"]) for e in answer["explanations"]]
    assert len(annotated) == 2
    pictures = [Image.open(io.BytesIO(a)) for a in annotated]
    assert all(p.format == "PNG" and min(p.size) >= 224 for p in pictures)
    path = "/v2/models/mnist_cnn/explain"
    plain = base64.b64decode(answer["explanations"][0]["overlay_png"])
    for query, want in (("?annotated=true&method=hirescam", "annotated"), ("", "plain")):
        status, kind, body = _post(server, path + query, png, {"Accept": "image/png"})
        assert status == 200 and kind == "image/png", body[:300]
        size = Image.open(io.BytesIO(body)).size
        if want == "annotated":
            assert min(size) >= 224 and body != plain
        else:
            assert size == Image.open(io.BytesIO(plain)).size


@pytest.mark.parametrize(
    ("query", "document", "message"),
    [
        ("method=fullgrad", None, "'fullgrad' is not offered"),
        ("method=integrated_gradients&ig_steps=500", None, f"1 to {modelrepo.MAX_IG_STEPS}"),
        ("ig_steps=-3", None, "got -3"),
        ("ig_steps=many", None, "'ig_steps' must be an integer"),
        ("heatmap_scale=sideways", None, "'heatmap_scale' must be one of per_class, shared"),
        ("annotated=maybe", None, "'annotated' must be true or false"),
        ("heatmap_scale=shared&method=saliency", None, "use the per-class scale"),
        ("", {"method": 3}, "'method' must be a string"),
        ("", {"ig_steps": "8.5"}, "'ig_steps' must be an integer"),
        ("", {"heatmap_scale": ["shared"]}, "not a JSON array"),
    ],
)
def test_http_explain_refuses_bad_options(
    server: ServerThread,
    digits: np.ndarray,
    query: str,
    document: dict[str, Any] | None,
    message: str,
) -> None:
    png = _digit_png(digits[0])
    path = "/v2/models/mnist_cnn/explain"
    if document is None:
        status, _, body = _post(server, f"{path}?{query}", png)
    else:
        document = {"image": base64.b64encode(png).decode(), **document}
        headers = {"Content-Type": "application/json"}
        status, _, body = _post(server, path, json.dumps(document).encode(), headers)
    assert status == 400, body[:300]
    assert message in json.loads(body)["error"]


def test_the_page_lists_each_models_methods(server: ServerThread) -> None:
    with urllib.request.urlopen(server.http_url + "/ui/models", timeout=30) as response:
        listing = json.loads(response.read())
    assert listing["models"] == ["mnist_cnn"]
    assert listing["methods"] == {"mnist_cnn": list(modelrepo.ALL_METHODS)}
    assert listing["titles"]["gradcam_plusplus"] == "Grad-CAM++"


def test_client_explain_ig_steps(
    server: ServerThread, digits: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from client.__main__ import main

    image = tmp_path / "digit.png"
    image.write_bytes(_digit_png(digits[2]))
    common = ["--url", server.address, "--method", "integrated_gradients"]
    outs = {}
    for steps in ("8", ""):
        outs[steps] = tmp_path / f"ig{steps or 'default'}.png"
        argv = ["explain", str(image), "--out", str(outs[steps]), *common]
        assert main(argv + (["--ig-steps", steps] if steps else [])) == 0
    printed = capsys.readouterr().out
    assert "integrated_gradients (8 steps) for class" in printed
    assert f"integrated_gradients ({modelrepo.DEFAULT_IG_STEPS} steps) for class" in printed
    pictures = {k: np.asarray(Image.open(v).convert("RGB")) for k, v in outs.items()}
    assert pictures["8"].shape == pictures[""].shape
    assert not np.array_equal(pictures["8"], pictures[""])
    sheet = tmp_path / "sheet.png"
    argv = ["explain", str(image), "--method", "all", "--ig-steps", "8", "--out", str(sheet)]
    assert main([*argv, "--url", server.address]) == 0
    assert sheet.read_bytes().startswith(b"\x89PNG")
    argv = ["explain", str(image), "--ig-steps", "500", *common]
    assert main(argv) == 1
    refused = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in refused and f"1 to {modelrepo.MAX_IG_STEPS}" in refused
    with pytest.raises(SystemExit):
        main(["explain", str(image), "--ig-steps", "0", *common])
