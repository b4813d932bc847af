"""Metrics a dashboard can use: the call each request came through, Explain's whole time, the
rejected counter by call and known model, and no `_created` series."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from tests.support.harness import ServerThread, infer_request, running_server, stub
from tests.support.onnx_models import images, write_test_repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = write_test_repository(tmp_path_factory.mktemp("repository"), broken=False)
    with running_server(repository) as thread:
        yield thread


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _picture() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((images(1)[0, 0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_requests_carry_their_call_and_explain_has_its_whole_time(server: ServerThread) -> None:
    request = infer_request("classifier", images(1))
    with server.channel() as channel:
        client = stub(channel)
        client.ModelInfer(request, timeout=30)
        list(client.ModelStreamInfer(iter([request, request]), timeout=30))
        explainer = ex_grpc.ExplainerStub(channel)
        explainer.Explain(ex.ExplainRequest(model_name="classifier", image=_picture()), timeout=30)
        with pytest.raises(grpc.RpcError):
            explainer.Explain(ex.ExplainRequest(model_name="classifier", image=b"x"), timeout=30)
    text = server.scrape()
    requests = "cnnserve_requests_total"
    assert _value(text, requests, model="classifier", call="ModelInfer") == 1
    assert _value(text, requests, model="classifier", call="ModelStreamInfer") == 2
    assert _value(text, requests, model="classifier_gradcam", call="Explain") >= 1
    durations = "cnnserve_request_duration_seconds_count"
    assert _value(text, durations, model="classifier", call="ModelInfer") == 1
    whole = "cnnserve_explain_duration_seconds_count"
    assert _value(text, whole, model="classifier", outcome="success") == 1
    assert _value(text, whole, model="classifier", outcome="invalid_argument") == 1
    explain_sum = _value(text, "cnnserve_explain_duration_seconds_sum", outcome="success")
    model_sum = _value(
        text, "cnnserve_request_duration_seconds_sum", model="classifier_gradcam", call="Explain"
    )
    assert explain_sum > model_sum > 0  # the picture work is in the whole time only


def test_rejections_name_the_call_and_a_known_model_only(server: ServerThread) -> None:
    before = server.scrape()
    bad = infer_request("classifier", images(1))
    bad.inputs[0].name = "nope"
    with server.channel() as channel:
        client = stub(channel)
        for name in ("classifier", "no_such_model_" + "x" * 20):
            bad.model_name = name
            with pytest.raises(grpc.RpcError):
                client.ModelInfer(bad, timeout=30)
    after = server.scrape()
    rejected = "cnnserve_rejected_requests_total"

    def grew(**labels: str) -> float:
        return _value(after, rejected, **labels) - _value(before, rejected, **labels)

    assert grew(reason="invalid_argument", call="ModelInfer", model="classifier") == 1
    assert grew(reason="not_found", call="ModelInfer", model="") == 1
    assert "no_such_model_" not in after  # a name a client made up is no label value


def test_no_created_series_and_promtool_accepts_the_metrics(server: ServerThread) -> None:
    with server.channel() as channel:
        stub(channel).ModelInfer(infer_request("classifier", images(1)), timeout=30)
        stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
    text = server.scrape()
    assert "_created" not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is installed by `make sysdeps` (Debian's prometheus package)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_calls_first_request_starts_every_outcome_at_zero(server: ServerThread) -> None:
    with server.channel() as channel:
        stub(channel).ModelInfer(infer_request("classifier", images(1)), timeout=30)
    text = server.scrape()
    for outcome in ("internal", "unavailable", "resource_exhausted", "deadline_exceeded"):
        assert re.search(
            rf'^cnnserve_requests_total{{(?=[^}}]*call="ModelInfer")(?=[^}}]*model="classifier")'
            rf'(?=[^}}]*outcome="{outcome}")[^}}]*}} \S+$',
            text,
            re.M,
        ), outcome  # the error ratio's numerator exists (at 0) once the call has been seen
