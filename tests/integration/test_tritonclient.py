"""Real third-party clients against the real server: tritonclient and perf_analyzer.

Both run as subprocesses from the tools venv: tritonclient's generated `inference` package must
never be imported next to ours.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.deploy.tools import missing
from tests.support.harness import ServerThread, running_server
from tests.support.tools_venv.paths import (
    PERF_ANALYZER,
    SCRIPTS,
    perf_analyzer_env,
    require_tools_python,
)

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository) as thread:
        yield thread


def test_tritonclient_end_to_end(
    server: ServerThread, mnist_repository: Path, tmp_path: Path
) -> None:
    python = require_tools_python()
    done = subprocess.run(
        [str(python), str(SCRIPTS / "triton_checks.py"), server.address, MODEL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["live"] and summary["ready"] and summary["model_ready"]
    assert "statistics" in summary["server"]["extensions"]
    inputs = {t["name"]: t for t in summary["metadata"]["inputs"]}
    assert inputs["input"]["datatype"] == "FP32"
    assert [int(d) for d in inputs["input"]["shape"]] == [-1, 1, 28, 28]
    assert summary["max_batch_size"] > 0
    assert summary["provider"] == {"string_value": "CPUExecutionProvider"}
    assert summary["response_id"] == "parity"
    assert summary["bad_datatype"] == "StatusCode.INVALID_ARGUMENT"

    # parity: what tritonclient got equals ONNX Runtime run directly on the same file
    session = ort.InferenceSession(
        str(mnist_repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    images = np.load(tmp_path / "inputs.npy")
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, {"input": images}), strict=True))
    for name in ("logits", "probabilities"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected[name], atol=1e-5)

    # classification: top-3 strings "value:index:label", best first, matching the probabilities
    best = expected["probabilities"].argmax(axis=1)
    for row, classes in enumerate(summary["top3"]):
        value, index, *label = classes[0].split(":")
        assert int(index) == best[row]
        assert abs(float(value) - expected["probabilities"][row, best[row]]) < 1e-5
        assert label, "labels from labels.txt are attached"
        assert len(classes) == 3

    stats = summary["statistics"]
    assert stats["success"] >= 2 and stats["fail"] >= 1
    assert stats["inference_count"] >= 8 and 4 in stats["batch_sizes"]
    assert summary["index"][MODEL] == "READY"


def test_perf_analyzer_runs_clean(server: ServerThread) -> None:
    require_tools_python()
    if not PERF_ANALYZER.exists():
        missing(f"{PERF_ANALYZER} is missing (make tools installs it)")
    done = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-m",
            MODEL,
            "-i",
            "grpc",
            "-u",
            server.address,
            "--concurrency-range",
            "1:8:7",  # two levels: the check is that it runs clean, not how fast (noisy host)
            "--measurement-interval",
            "300",
            "--stability-percentage",
            "100",
            "--max-trials",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=perf_analyzer_env(),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Concurrency: 8, throughput:" in done.stdout


def test_exported_explainer_is_served_with_target_checks(
    server: ServerThread, mnist_repository: Path
) -> None:
    import grpc

    from tests.support.harness import infer_request, stub

    explainer = f"{MODEL}_gradcam"
    assert (mnist_repository / explainer).is_dir(), f"the export step wrote no {explainer}"
    images = np.random.default_rng(5).random((3, 1, 28, 28), dtype=np.float32)
    with server.channel() as channel:
        client = stub(channel)
        targets = np.array([[-1], [0], [9]], dtype=np.int64)
        request = infer_request(explainer, images, extra_inputs={"target_class": targets})
        response = client.ModelInfer(request)
        outputs = {o.name: i for i, o in enumerate(response.outputs)}
        cam = np.frombuffer(response.raw_output_contents[outputs["cam"]], np.float32)
        assert cam.size == 3 * 28 * 28 and np.isfinite(cam).all()
        explained = np.frombuffer(
            response.raw_output_contents[outputs["explained_class"]], np.int64
        )
        assert explained[1:].tolist() == [0, 9]
        for bad in (10, -2):
            targets = np.array([[bad]], dtype=np.int64)
            request = infer_request(explainer, images[:1], extra_inputs={"target_class": targets})
            with pytest.raises(grpc.RpcError) as info:
                client.ModelInfer(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
