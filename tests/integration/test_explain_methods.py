"""Every explanation method served: the explain API's `method`, ModelInfer's `method` parameter.

The served maps are compared with the same folder's graphs run directly (export.gradcam.run),
which tests/export/test_methods.py holds to pytorch-grad-cam and Captum.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
    with running_server(mnist_repository) as thread:
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
