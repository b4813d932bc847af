"""What a person using the client and the explain API meets, against a real server."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from service.core.errors import InvalidInput
from tests.conftest import ROOT
from tests.support.harness import ServerThread, infer_request, running_server, stub
from training.data import load_mnist

EXPLAINER = "mnist_cnn_gradcam"


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository) as thread:
        yield thread


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist("test")
    return images[:16], labels[:16]


def _png(pixels: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(np.kron(pixels, np.ones((scale, scale), dtype=np.uint8)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _cli(server: ServerThread, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", "--url", server.address, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# The explainer given where a classifier is expected: every path names the missing input.


def _explain_error(server: ServerThread, request: ex.ExplainRequest) -> grpc.RpcError:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        ex_grpc.ExplainerStub(channel).Explain(request, timeout=30)
    return err.value


def test_classifying_the_explainer_names_the_missing_input(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    image = _png(digits[0][0])
    error = _explain_error(
        server, ex.ExplainRequest(model_name=EXPLAINER, image=image, predictions_only=True)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input(s): target_class" in (error.details() or "")


def test_explaining_with_the_explainers_name_points_to_the_classifier(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    error = _explain_error(
        server, ex.ExplainRequest(model_name=EXPLAINER, image=_png(digits[0][0]))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'mnist_cnn'" in (error.details() or "")


def test_model_infer_unary_and_stream_name_the_missing_input(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    request = infer_request(EXPLAINER, digits[0][:1, None].astype(np.float32) / 255.0)
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "target_class" in (err.value.details() or "")
        (answer,) = stub(channel).ModelStreamInfer(iter([request]), timeout=30)
    assert "missing input(s): target_class" in answer.error_message


def test_a_served_model_called_without_an_input_refuses_before_running(
    server: ServerThread,
) -> None:
    assert server.server is not None
    _, model = server.server.repository.get(EXPLAINER, "")
    pixels = np.zeros((1, 1, 28, 28), dtype=np.float32)
    with pytest.raises(InvalidInput, match="missing input\\(s\\): target_class"):
        server.call(model.infer({"input": pixels}, 1, 10.0))


def test_the_client_cli_classifying_the_explainer_says_what_is_missing(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(_png(digits[0][0]))
    result = _cli(server, "classify", str(image), "--model", EXPLAINER)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "target_class" in result.stderr


def test_a_turned_phone_photo_of_a_digit_classifies_right(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """A dark digit on paper, stored turned 90° with EXIF orientation 6, as phones do."""
    right = 0
    with server.channel() as channel:
        explainer = ex_grpc.ExplainerStub(channel)
        for pixels, label in zip(*digits, strict=True):
            upright = np.kron(255 - pixels, np.ones((8, 8), dtype=np.uint8))
            exif = Image.Exif()
            exif[0x0112] = 6  # turn 90° clockwise to view
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
                buffer, format="JPEG", quality=90, exif=exif
            )
            request = ex.ExplainRequest(
                model_name="mnist_cnn", image=buffer.getvalue(), predictions_only=True
            )
            top = explainer.Explain(request, timeout=30).predictions[0]
            right += top.class_index == label
    assert right >= len(digits[1]) - 1, f"{right} of {len(digits[1])} right"
