"""Prometheus collectors, built on a registry passed in (tests give each server a fresh one).

Latencies are histograms in seconds so they aggregate across replicas; queue depth and in-flight
counts are read lazily at scrape time, costing nothing per request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.errors import REJECT_REASONS, REQUEST_FAILURES

log = logging.getLogger(__name__)

NAMESPACE = "cnnserve"
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES = ("success", *REQUEST_FAILURES)


class VersionMetrics:
    """Label-bound children for one model version, so the hot path skips label lookups."""

    def __init__(self, metrics: ServingMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self.labels = (model, version)
        self.request_seconds = metrics.request_seconds.labels(model, version)
        self.queue_seconds = metrics.queue_seconds.labels(model, version)
        self.compute_seconds = metrics.compute_seconds.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self.inferences = metrics.inferences.labels(model, version)
        self._outcomes = {o: metrics.requests.labels(model, version, o) for o in OUTCOMES}

    def request_done(self, outcome: str, seconds: float) -> None:
        """Count one finished request and observe its duration."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._metrics.requests.labels(*self.labels, outcome)
            self._outcomes[outcome] = counter
        counter.inc()
        self.request_seconds.observe(seconds)

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Report queue depth and in-flight requests from these callables at scrape time."""
        self._metrics.live_owner[self.labels] = self
        self._metrics.queue_depth.labels(*self.labels).set_function(queue_depth)
        self._metrics.in_flight.labels(*self.labels).set_function(in_flight)

    def set_provider(self, provider: str) -> None:
        """Expose the execution provider in use as an info-style gauge."""
        self._metrics.provider.labels(*self.labels, provider).set(1)

    def remove(self) -> None:
        """Drop the live-state series of this version, unless a reload has taken them over."""
        if self._metrics.live_owner.get(self.labels) is not self:
            return
        del self._metrics.live_owner[self.labels]
        for family in (self._metrics.queue_depth, self._metrics.in_flight):
            with contextlib.suppress(KeyError):
                family.remove(*self.labels)
        for labels in list(self._metrics.provider._metrics):
            if tuple(labels[:2]) == self.labels:
                self._metrics.provider.remove(*labels)


class ServingMetrics:
    """Every collector the server exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        per_version = ("model", "version")
        self.requests = Counter(
            "requests", "Inference requests by outcome", (*per_version, "outcome"),
            namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.inferences = Counter(
            "inferences", "Images (batch elements) inferred successfully", per_version,
            namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "request_duration_seconds", "Whole request time in the server, decode to encode",
            per_version, namespace=NAMESPACE, registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "queue_duration_seconds", "Time a request waited for its batch to start",
            per_version, namespace=NAMESPACE, registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "compute_duration_seconds", "Time to run one batch (merge, run, split)",
            per_version, namespace=NAMESPACE, registry=registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = Histogram(
            "batch_size", "Executed batch sizes, in images", per_version,
            namespace=NAMESPACE, registry=registry, buckets=BATCH_BUCKETS,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for a batch", per_version,
            namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "inflight_requests", "Requests accepted and not yet answered", per_version,
            namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.model_state = Gauge(
            "model_state", "1 for the state each model is in (READY, UNAVAILABLE, ...)",
            ("model", "state"), namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.provider = Gauge(
            "execution_provider_info", "ONNX Runtime execution provider a model version runs on",
            (*per_version, "provider"), namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "rejected_requests", "Requests answered with an error, by reason (a fixed set)",
            ("reason",), namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._gpu: GpuCollector | None = None
        # Which loaded instance reports a version's live gauges: a reload hands them over.
        self.live_owner: dict[tuple[str, str], VersionMetrics] = {}

    def version(self, model: str, version: str) -> VersionMetrics:
        """Bound children for one model version."""
        return VersionMetrics(self, model, version)

    def set_model_state(self, model: str, state: str, states: Iterable[str]) -> None:
        """Mark `state` as the model's current one (1) and the others 0."""
        for s in states:
            self.model_state.labels(model, s).set(1 if s == state else 0)

    def enable_gpu(self, device_ids: Iterable[int] = (0,)) -> bool:
        """Export GPU utilisation and memory through NVML when it is available."""
        if self._gpu is not None:
            return True
        try:
            collector = GpuCollector(tuple(device_ids))
        except Exception as exc:  # no pynvml, no driver: metrics stay CPU-only
            log.warning("GPU metrics unavailable: %s", exc)
            return False
        self.registry.register(collector)
        self._gpu = collector
        return True


class GpuCollector(Collector):
    """GPU utilisation and memory per device, read from NVML at scrape time."""

    def __init__(self, device_ids: tuple[int, ...]) -> None:
        import pynvml  # optional: nvidia-ml-py, present only on GPU images

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in device_ids}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        util = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_utilization_ratio", "GPU busy fraction", labels=("gpu",)
        )
        used = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_memory_used_bytes", "GPU memory in use", labels=("gpu",)
        )
        total = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_memory_total_bytes", "GPU memory size", labels=("gpu",)
        )
        for index, handle in self._handles.items():
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric((str(index),), rates.gpu / 100.0)
            used.add_metric((str(index),), float(memory.used))
            total.add_metric((str(index),), float(memory.total))
        return [util, used, total]
