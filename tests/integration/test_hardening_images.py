"""Hostile pictures on the explain API against a real server: the status, a bound on the server's
CPU time and memory for each, and then a good request that succeeds.

The server runs in this process (a thread with its own event loop), so its CPU time is this
process's and its memory is this process's RSS; the peak is reset before each case
(/proc/self/clear_refs) so VmHWM measures that case alone.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

import service.explain.pipeline
from bench.pictures import jpeg_claiming as _jpeg_claiming
from bench.pictures import png_claiming as _png_claiming
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from service.core.errors import DeadlineExceeded, ServingError
from service.explain.imaging import (
    MAX_DECODED_PIXELS,
    MAX_IMAGE_PIXELS,
    MAX_OVERLAY_SIDE,
    Cancelled,
)
from tests.support.harness import ServerThread, running_server, stub
from tests.support.onnx_models import write_test_repository

MODEL = "classifier"  # explained by classifier_gradcam
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = write_test_repository(tmp_path_factory.mktemp("repository"), broken=False)
    with running_server(repository) as thread:
        yield thread


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Cost:
    cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_growth: int = 0  # bytes of RSS above the start, at the peak


@contextmanager
def measured() -> Iterator[Cost]:
    """CPU time, wall time and peak RSS growth of this process over a with-block."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    cost = Cost()
    start_rss = _status_kb("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    yield cost
    cost.cpu_s = time.process_time() - cpu
    cost.wall_s = time.perf_counter() - wall
    cost.peak_growth = (_status_kb("VmHWM") - start_rss) * 1024


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _explain(server: ServerThread, image: bytes, timeout: float = 60) -> ex.ExplainResponse:
    with server.channel() as channel:
        request = ex.ExplainRequest(model_name=MODEL, image=image, top_k=3)
        response: ex.ExplainResponse = ex_grpc.ExplainerStub(channel).Explain(
            request, timeout=timeout
        )
        return response


def _good_request_succeeds(server: ServerThread) -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    response = _explain(server, _png(Image.fromarray(digit)))
    assert len(response.explanations) == 3
    with Image.open(io.BytesIO(response.explanations[0].overlay_png)) as overlay:
        assert overlay.size == (28, 28)


def _explainer_inferences(server: ServerThread) -> int:
    with server.channel() as channel:
        stats = stub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=f"{MODEL}_gradcam"), timeout=10
        )
    return int(stats.model_stats[0].inference_count)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_20000x1000_black_png_answers_fast_with_a_small_result(
    server: ServerThread, mode: str
) -> None:
    image = _png(Image.new(mode, (20000, 1000)))
    assert len(image) < 100_000
    with measured() as cost:
        response = _explain(server, image)
    assert cost.cpu_s < 1.0, f"{cost.cpu_s:.2f} s of CPU"
    assert cost.peak_growth < 150 * MiB, f"RSS grew {cost.peak_growth / MiB:.0f} MiB at its peak"
    pixels = np.frombuffer(response.model_input, dtype="<f4")
    assert list(response.model_input_shape) == [1, 28, 28] and not pixels.any()
    assert len(response.explanations) == 3
    for explanation in response.explanations:
        with Image.open(io.BytesIO(explanation.overlay_png)) as overlay:
            assert overlay.size == (MAX_OVERLAY_SIDE, 26)
    _good_request_succeeds(server)


@pytest.mark.parametrize(
    ("image", "limit"),
    [
        (_png_claiming(100_000, 100_000), MAX_IMAGE_PIXELS),
        (_png_claiming(6000, 6000), MAX_DECODED_PIXELS),
        (_jpeg_claiming(60_000, 60_000), MAX_IMAGE_PIXELS),
    ],
    ids=["png-100000x100000", "png-6000x6000", "jpeg-60000x60000"],
)
def test_pictures_over_the_limits_are_invalid_argument_before_decoding(
    server: ServerThread, image: bytes, limit: int
) -> None:
    with measured() as cost, pytest.raises(grpc.RpcError) as err:
        _explain(server, image)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit:,}-pixel limit" in (err.value.details() or "")
    assert cost.cpu_s < 0.3, f"{cost.cpu_s:.2f} s of CPU"
    assert cost.peak_growth < 20 * MiB, f"RSS grew {cost.peak_growth / MiB:.0f} MiB at its peak"
    _good_request_succeeds(server)


def test_a_large_jpeg_is_decoded_reduced_and_drawn_small(server: ServerThread) -> None:
    photo = np.zeros((3000, 4000), dtype=np.uint8)
    photo[500:2500, 1800:2200] = 255  # a thick "1"
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    with measured() as cost:
        response = _explain(server, buffer.getvalue())
    assert cost.cpu_s < 1.0, f"{cost.cpu_s:.2f} s of CPU"
    assert cost.peak_growth < 60 * MiB, f"RSS grew {cost.peak_growth / MiB:.0f} MiB at its peak"
    with Image.open(io.BytesIO(response.explanations[0].overlay_png)) as overlay:
        assert overlay.size == (MAX_OVERLAY_SIDE, 384)
    pixels = np.frombuffer(response.model_input, dtype="<f4").reshape(28, 28)
    assert pixels[14, 14] > 0.9 and pixels[14, 2] < 0.05
    _good_request_succeeds(server)


@pytest.fixture
def read_input_outcomes(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    """What each call of the explain API's picture decoding ended with (None: it finished)."""
    outcomes: list[BaseException | None] = []
    done = threading.Condition()
    original: Callable[..., Any] = service.explain.pipeline.read_input

    def recorded(*args: Any) -> Any:
        try:
            result = original(*args)
        except ServingError as exc:
            outcome: BaseException | None = exc
            raise
        else:
            outcome = None
            return result
        finally:
            with done:
                outcomes.append(outcome)
                done.notify_all()

    monkeypatch.setattr(service.explain.pipeline, "read_input", recorded)
    return outcomes


def _wait_for(outcomes: list[BaseException | None], timeout: float = 30) -> BaseException | None:
    end = time.monotonic() + timeout
    while not outcomes and time.monotonic() < end:
        time.sleep(0.01)
    assert outcomes, "the decoding never finished"
    return outcomes[0]


class _SlowDecode:
    """Makes the first decoding step slow, so the deadline or the cancel lands inside it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        original = service.explain.pipeline.decode_image

        def slow(*args: Any) -> Any:
            time.sleep(self.seconds)
            return original(*args)

        monkeypatch.setattr(service.explain.pipeline, "decode_image", slow)


def test_picture_work_past_the_deadline_stops_and_runs_no_model(
    server: ServerThread,
    read_input_outcomes: list[BaseException | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _SlowDecode(monkeypatch, 0.5)
    before = _explainer_inferences(server)
    with pytest.raises(grpc.RpcError) as err:
        _explain(server, _png(Image.new("L", (2000, 1000))), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(_wait_for(read_input_outcomes), (DeadlineExceeded, Cancelled))
    assert _explainer_inferences(server) == before
    monkeypatch.undo()
    _good_request_succeeds(server)


def test_picture_work_stops_when_the_client_cancels(
    server: ServerThread,
    read_input_outcomes: list[BaseException | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _SlowDecode(monkeypatch, 0.5)
    before = _explainer_inferences(server)
    with server.channel() as channel:
        request = ex.ExplainRequest(model_name=MODEL, image=_png(Image.new("L", (2000, 1000))))
        future = ex_grpc.ExplainerStub(channel).Explain.future(request, timeout=60)
        time.sleep(0.2)
        assert future.cancel()
    assert isinstance(_wait_for(read_input_outcomes), Cancelled)
    assert _explainer_inferences(server) == before
    monkeypatch.undo()
    _good_request_succeeds(server)
