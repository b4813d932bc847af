"""The core's pieces one at a time, on real ONNX Runtime sessions of tiny graphs: the session
(runtime), loading, the served model, its statistics, and the metrics it feeds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import modelrepo
from pb import model_config_pb2 as mc
from service.config import Settings
from service.core.batcher import BatchRecord, BatchResult
from service.core.errors import InvalidInput, QueueFull
from service.core.loading import build_signature, load_version
from service.core.repository import read_model
from service.core.runtime import CPU, OnnxSession, session_options
from service.core.statistics import VersionStatistics
from service.observability.metrics import UNKNOWN_MODEL, ServingMetrics
from service.rpc.statistics import statistics_message
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    explainer_config,
    explainer_graph,
    images,
    reference_logits,
    write_model,
)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(f"cnnserve_{name}", labels)
    return 0.0 if value is None else value


# ---- runtime ------------------------------------------------------------------------------


def test_session_runs_a_batch_and_reports_its_tensors(tmp_path: Path) -> None:
    directory = write_model(tmp_path, classifier_config("m"), classifier_graph())
    session = OnnxSession(directory / "1" / modelrepo.MODEL_FILE, device="cpu")
    assert session.provider == CPU
    assert [(t.name, t.datatype) for t in session.inputs] == [("input", "FP32")]
    assert {t.name: t.datatype for t in session.outputs} == {
        "logits": "FP32",
        "probabilities": "FP32",
    }
    x = images(3)
    out = session.run({"input": x})
    np.testing.assert_allclose(out["logits"], reference_logits(x), atol=1e-5)
    assert list(session.run({"input": x}, ["probabilities"])) == ["probabilities"]


def test_explainer_session_takes_int64_targets(tmp_path: Path) -> None:
    directory = write_model(tmp_path, explainer_config("m_gradcam"), explainer_graph())
    session = OnnxSession(directory / "1" / modelrepo.MODEL_FILE, device="cpu")
    datatypes = {t.name: t.datatype for t in session.inputs}
    assert datatypes == {"input": "FP32", "target_class": "INT64"}


def test_session_options() -> None:
    options = session_options(3, spinning=False)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


# ---- loading and the served model -----------------------------------------------------------


def test_signature_from_the_config_and_labels(tmp_path: Path) -> None:
    write_model(tmp_path, classifier_config("m", max_batch_size=8), classifier_graph())
    signature = build_signature(read_model(tmp_path / "m"))
    assert signature.max_batch_size == 8 and signature.batching
    assert signature.outputs_by_name["probabilities"].labels[2] == "digit_2"


def test_served_model_answers_counts_and_reports(tmp_path: Path) -> None:
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    settings = Settings(model_repository=tmp_path, latency_threads=0, intra_op_threads=1)
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)

    async def run() -> None:
        model = await load_version(read_model(tmp_path / "m"), 1, settings, metrics)
        try:
            x = images(2)
            out = await model.infer({"input": x}, 2)
            np.testing.assert_allclose(out["logits"], reference_logits(x), atol=1e-5)
            model.request_failed(0, InvalidInput("bad"))
            model.request_failed(0, QueueFull("full"))
            model.request_failed(0, RuntimeError("bug"))
            model.request_failed(0, asyncio.CancelledError())
            assert model.cancelled == 1
            assert model.stats.success.count == 1 and model.stats.fail.count == 4
            assert model.stats.inference_count == 2 and model.stats.execution_count == 1
            labels = {"model": "m", "version": "1"}
            for outcome in ("success", "invalid_argument", "resource_exhausted", "internal"):
                assert (
                    sample(registry, "requests_total", **labels, outcome=outcome, call="other") == 1
                )
            assert sample(registry, "inferences_total", **labels) == 2
            config = model.reported_config()
            assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
            assert config.parameters[modelrepo.EXECUTION_PROVIDER].string_value == CPU
        finally:
            await model.close()
        assert model.sessions == []

    asyncio.run(run())


# ---- statistics ---------------------------------------------------------------------------


def test_statistics_and_their_message() -> None:
    stats = VersionStatistics("m", "3")
    record = BatchRecord(size=4, requests=1, input_ns=10, infer_ns=100, output_ns=5, error=None)
    stats.batch_executed(record)
    stats.batch_executed(
        BatchRecord(size=2, requests=1, input_ns=1, infer_ns=1, output_ns=1, error=None)
    )
    stats.batch_executed(
        BatchRecord(size=2, requests=1, input_ns=1, infer_ns=1, output_ns=1, error=RuntimeError())
    )
    stats.request_succeeded(1_000, BatchResult(outputs={}, queue_ns=50, batch=record), 4)
    stats.request_failed(70)
    message = statistics_message(stats)
    assert (message.name, message.version) == ("m", "3")
    assert message.inference_count == 4 and message.execution_count == 2
    assert message.inference_stats.success.count == 1 and message.inference_stats.success.ns == 1000
    assert message.inference_stats.fail.ns == 70
    assert message.inference_stats.queue.ns == 50
    assert message.inference_stats.compute_infer.ns == 100
    assert [b.batch_size for b in message.batch_stats] == [2, 4]  # sorted, failed batch left out
    assert message.batch_stats[1].compute_infer.ns == 100
    assert message.last_inference > 0


# ---- metrics ------------------------------------------------------------------------------


def test_metrics_per_version_and_removal() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    version = metrics.version("m", "1")
    version.request_done("success", 0.002)
    version.request_done("not_found", 0.001)
    version.watch(lambda: 3, lambda: 5)
    labels = {"model": "m", "version": "1"}
    assert sample(registry, "requests_total", **labels, outcome="success", call="other") == 1
    assert sample(registry, "requests_total", **labels, outcome="not_found", call="other") == 1
    assert sample(registry, "request_duration_seconds_count", **labels, call="other") == 2
    assert sample(registry, "queue_depth", **labels) == 3
    assert sample(registry, "inflight_requests", **labels) == 5
    metrics.set_model_state("m", "READY", ("READY", "UNAVAILABLE"))
    assert sample(registry, "model_state", model="m", state="READY") == 1
    assert sample(registry, "model_state", model="m", state="UNAVAILABLE") == 0
    version.remove()
    assert registry.get_sample_value("cnnserve_queue_depth", labels) is None


def test_request_series_read_as_prometheus_clients_own_would() -> None:
    """The request path keeps plain counts (no lock per increment); scraped, they must say what
    prometheus_client's Counter and Histogram say for the same observations, bucket for bucket
    (a value on a bound counts in that bound's bucket)."""
    from prometheus_client import Counter, Histogram, generate_latest

    from service.observability.metrics import BATCH_BUCKETS, CALL, LATENCY_BUCKETS

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    version = ServingMetrics(ours).version("m", "1")
    per_version = ("model", "version")
    kw = {"namespace": "cnnserve", "registry": theirs}
    requests = Counter("requests", "r", (*per_version, "outcome", "call"), **kw)
    inferences = Counter("inferences", "i", per_version, **kw)
    durations = Histogram("request_duration_seconds", "d", (*per_version, "call"),
                          buckets=LATENCY_BUCKETS, **kw)  # fmt: skip
    queue = Histogram("queue_duration_seconds", "q", per_version, buckets=LATENCY_BUCKETS, **kw)
    compute = Histogram("compute_duration_seconds", "c", per_version, buckets=LATENCY_BUCKETS, **kw)
    batch = Histogram("batch_size", "b", per_version, buckets=BATCH_BUCKETS, **kw)
    values = [0.0, 0.0001, 0.00011, 0.0005, 0.003, 0.25, 2.5, 7.0, 1e-9]
    token = CALL.set("ModelInfer")
    try:
        for index, seconds in enumerate(values):
            version.request_succeeded(seconds, seconds / 2, index + 1)
            requests.labels("m", "1", "success", "ModelInfer").inc()
            durations.labels("m", "1", "ModelInfer").observe(seconds)
            queue.labels("m", "1").observe(seconds / 2)
            inferences.labels("m", "1").inc(index + 1)
            version.batch_done(2**index, seconds)
            batch.labels("m", "1").observe(2**index)
            compute.labels("m", "1").observe(seconds)
        version.request_done("not_found", 0.004)
        requests.labels("m", "1", "not_found", "ModelInfer").inc()
        durations.labels("m", "1", "ModelInfer").observe(0.004)
    finally:
        CALL.reset(token)

    REQUEST_SERIES = tuple(
        f"cnnserve_{name}" for name in ("request", "inferences", "queue", "compute", "batch")
    )

    def samples(registry: CollectorRegistry) -> dict[tuple, float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if s.name.startswith(REQUEST_SERIES) and s.value  # ours: every outcome, even at 0
        }

    assert samples(ours) == samples(theirs)
    assert len(samples(ours)) > 60
    text = generate_latest(ours).decode()
    assert 'cnnserve_batch_size_bucket{le="256.0",model="m",version="1"} 9.0' in text
    assert "# TYPE cnnserve_request_duration_seconds histogram" in text
    assert (
        'cnnserve_requests_total{call="ModelInfer",model="m",outcome="internal",version="1"} 0.0'
        in text
    )


@pytest.mark.parametrize("reason", ["malformed", "unauthenticated", "internal"])
def test_rejection_reasons_exist_at_zero(reason: str) -> None:
    registry = CollectorRegistry()
    ServingMetrics(registry)
    labels = {"reason": reason, "call": "other", "model": UNKNOWN_MODEL}
    assert registry.get_sample_value("cnnserve_rejected_requests_total", labels) == 0
