"""Grad-CAM served by ONNX Runtime: ModelInfer on <model>_gradcam and the explain API, end to end."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from bench.loadgen import free_port
from export.gradcam import gradcam_reference
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from tests.conftest import ROOT
from tests.support.harness import ServerThread, infer_request, running_server, stub
from training.checkpoint import Checkpoint, load_checkpoint
from training.mnist import load_mnist

EXPLAINER = "mnist_cnn_gradcam"


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository) as thread:
        yield thread


@pytest.fixture(scope="module")
def checkpoint(mnist_checkpoint: Path) -> Checkpoint:
    return load_checkpoint(mnist_checkpoint)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist("test")
    return images[:64].astype(np.float32)[:, None] / 255.0, labels[:64]


def _explain(
    server: ServerThread, pixels: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    request = infer_request(
        EXPLAINER, pixels, extra_inputs={"target_class": targets.reshape(-1, 1).astype(np.int64)}
    )
    with server.channel() as channel:
        response = stub(channel).ModelInfer(request, timeout=60)
    return {
        out.name: np.frombuffer(
            raw, dtype=np.int64 if out.datatype == "INT64" else np.float32
        ).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _reference(ckpt: Checkpoint, pixels: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    ref = gradcam_reference(
        ckpt.model, "act2", torch.from_numpy(pixels), torch.from_numpy(targets), ckpt.mean, ckpt.std
    )
    return {k: v.detach().numpy() for k, v in ref.items()}


@pytest.mark.parametrize("batch", [1, 32])
def test_served_cam_matches_pytorch_autograd(
    server: ServerThread, checkpoint: Checkpoint, digits: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    pixels = digits[0][:batch]
    targets = (np.arange(batch) % 10).astype(np.int64)
    targets[::3] = -1  # mixed: predicted class and explicit classes
    served = _explain(server, pixels, targets)
    ref = _reference(checkpoint, pixels, targets)
    assert served["cam"].shape == (batch, 28, 28)
    assert np.abs(served["cam"] - ref["cam"]).max() < 1e-4
    assert np.abs(served["cam_raw"] - ref["cam_raw"]).max() < 1e-4
    assert served["cam"].max() == pytest.approx(1.0, abs=1e-6)  # min-max normalised per image


def test_same_image_same_map_alone_and_inside_a_batch(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels = digits[0][:16]
    targets = np.full(16, -1, dtype=np.int64)
    batch = _explain(server, pixels, targets)["cam"]
    alone = _explain(server, pixels[5:6], targets[5:6])["cam"]
    np.testing.assert_allclose(alone[0], batch[5], atol=1e-5)


def test_target_minus_one_explains_the_predicted_class(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    out = _explain(server, digits[0][:8], np.full(8, -1, dtype=np.int64))
    np.testing.assert_array_equal(
        out["explained_class"].reshape(-1), out["probabilities"].argmax(1)
    )
    explicit = _explain(server, digits[0][:2], np.array([3, 4]))
    assert explicit["explained_class"].reshape(-1).tolist() == [3, 4]


def test_all_black_image_gives_a_zero_map_not_nan(server: ServerThread) -> None:
    out = _explain(server, np.zeros((1, 1, 28, 28), np.float32), np.array([-1]))
    assert np.isfinite(out["cam"]).all()
    assert out["cam"].min() >= 0.0 and out["cam"].max() <= 1.0


@pytest.mark.parametrize("target", [10, -2, 1 << 40])
def test_out_of_range_targets_are_rejected_and_the_server_keeps_serving(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], target: int
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _explain(server, digits[0][:2], np.array([1, target]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target_class" in (err.value.details() or "")
    assert _explain(server, digits[0][:1], np.array([-1]))["cam"].shape == (1, 28, 28)


def _png(pixels: np.ndarray, scale: int = 1) -> bytes:
    grey = (np.kron(pixels, np.ones((scale, scale))) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def test_explain_api_returns_labelled_predictions_heatmaps_and_pictures(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    image = _png(digits[0][0, 0], scale=3)  # an 84x84 PNG of a real 7
    request = ex.ExplainRequest(model_name="mnist_cnn", image=image, top_k=3, feature_maps=True)
    with server.channel() as channel:
        response = ex_grpc.ExplainerStub(channel).Explain(request, timeout=60)
    assert response.predictions[0].label == str(digits[1][0])
    probabilities = [p.probability for p in response.predictions]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert [e.target.class_index for e in response.explanations] == [
        p.class_index for p in response.predictions
    ]
    first = response.explanations[0]
    heatmap = np.frombuffer(first.heatmap, dtype="<f4").reshape(tuple(first.heatmap_shape))
    assert heatmap.shape == (28, 28) and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    with Image.open(io.BytesIO(first.overlay_png)) as overlay:
        assert overlay.format == "PNG" and overlay.size == (84, 84)
    with Image.open(io.BytesIO(response.feature_maps_png)) as grid:
        assert grid.format == "PNG" and grid.size[0] > 200
    assert response.target_layer == "act2"


def test_explain_api_with_a_raw_tensor_matches_model_infer(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels = digits[0][1]
    tensor = ex.RawTensor(shape=[1, 28, 28], data=pixels.astype("<f4").tobytes())
    request = ex.ExplainRequest(model_name="mnist_cnn", tensor=tensor, target_classes=[2, 5])
    with server.channel() as channel:
        response = ex_grpc.ExplainerStub(channel).Explain(request, timeout=60)
    direct = _explain(server, np.stack([pixels, pixels]), np.array([2, 5]))["cam"]
    for explanation, cam in zip(response.explanations, direct, strict=True):
        heatmap = np.frombuffer(explanation.heatmap, dtype="<f4").reshape(28, 28)
        np.testing.assert_allclose(heatmap, cam, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (ex.ExplainRequest(model_name="mnist_cnn", image=b"definitely not a png"), "INVALID_ARGUMENT", "image"),
        (ex.ExplainRequest(model_name="mnist_cnn", image=b"\x89PNG\r\n\x1a\n\x00\x00"), "INVALID_ARGUMENT", "image"),
        (ex.ExplainRequest(model_name="mnist_cnn"), "INVALID_ARGUMENT", "input"),
        (ex.ExplainRequest(model_name="mnist_cnn", tensor=ex.RawTensor(shape=[28, 28], data=b"")), "INVALID_ARGUMENT", "tensor.shape"),
        (ex.ExplainRequest(model_name="no_such_model", image=b"x"), "NOT_FOUND", "no_such_model"),
        (ex.ExplainRequest(model_name="mnist_cnn", tensor=ex.RawTensor(shape=[1, 28, 28], data=bytes(3136)), target_classes=[12]), "INVALID_ARGUMENT", "target_class"),
    ],
    ids=["text", "truncated-png", "no-input", "tensor-shape", "unknown-model", "target-range"],
)  # fmt: skip
def test_explain_api_rejects_bad_requests_and_keeps_serving(
    server: ServerThread, request_: ex.ExplainRequest, code: str, text: str
) -> None:
    with server.channel() as channel:
        explainer = ex_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            explainer.Explain(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode[code]
        assert text in (err.value.details() or "")
        good = ex.ExplainRequest(model_name="mnist_cnn", image=_png(np.zeros((28, 28))))
        assert len(explainer.Explain(good, timeout=30).explanations) == 1


def test_explanations_show_in_statistics_and_metrics_under_their_own_name(
    server: ServerThread,
) -> None:
    with server.channel() as channel:
        stats = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=EXPLAINER), timeout=10)
    (model_stats,) = stats.model_stats
    assert model_stats.name == EXPLAINER and model_stats.inference_count > 0
    assert f'model="{EXPLAINER}"' in server.scrape()


def test_client_cli_classifies_explains_and_walks_a_directory(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        (folder / f"d{i}.png").write_bytes(_png(digits[0][i, 0], scale=2))
    cli = [sys.executable, "-m", "client", "--url", server.address]
    out = subprocess.run(
        [*cli, "classify", str(folder / "d0.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith(f"{folder / 'd0.png'}: {digits[1][0]} (")
    overlay = tmp_path / "overlay.png"
    subprocess.run(
        [*cli, "explain", str(folder / "d1.png"), "--out", str(overlay)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with Image.open(overlay) as img:
        assert img.size == (56, 56)
    subprocess.run(
        [*cli, "explain-dir", str(folder), "--out-dir", str(tmp_path / "out"), "--quiet"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].startswith("d0.png,")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "d0.png",
        "d1.png",
        "d2.png",
    ]


def test_the_explainer_is_served_with_torch_absent(
    mnist_repository: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    port = free_port()
    # `sys.modules["torch"] = None` makes every `import torch` fail: nothing on the path may need it.
    code = (
        "import sys; sys.modules['torch'] = None; from service.__main__ import main; "
        f"sys.exit(main(['--model-repository', {str(mnist_repository)!r}, '--grpc-port', '{port}', "
        "'--metrics-port', '-1', '--host', '127.0.0.1']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            inference = stub(channel)
            for _ in range(100):
                if inference.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
                    break
            request = infer_request(
                EXPLAINER,
                digits[0][:4],
                extra_inputs={"target_class": np.full((4, 1), -1, np.int64)},
            )
            response = inference.ModelInfer(request, timeout=60)
        assert [o.name for o in response.outputs][:1] and len(response.raw_output_contents) == len(
            response.outputs
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
