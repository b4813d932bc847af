"""Prometheus collectors, built on a registry passed in (tests give each server a fresh one).

Latencies are histograms in seconds so they aggregate across replicas; queue depth and in-flight
counts are read lazily at scrape time, costing nothing per request.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..core.errors import REJECT_REASONS, REQUEST_FAILURES

log = logging.getLogger(__name__)

# No `<name>_created` series beside every counter and histogram: they double the series count and
# nothing here reads them (rate() and increase() handle restarts without them).
disable_created_metrics()

# The RPC a request came in through (ModelInfer, ModelStreamInfer, Explain, ...): the front that
# receives it sets it, and every request counted in that context carries it as the `call` label.
CALL: contextvars.ContextVar[str] = contextvars.ContextVar("cnnserve_call", default="other")

NAMESPACE = "cnnserve"
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# An explanation decodes a picture, runs the explainer once or twice and draws: slower.
EXPLAIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNKNOWN_MODEL = ""  # the model label of a request naming no model the server knows
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES = ("success", *REQUEST_FAILURES)


class _Histogram:
    """Bucket counts and a sum, as plain numbers: updated on the event loop, read at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value in the first bucket whose upper bound holds it (`le`, inclusive)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def sample(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as Prometheus writes them, and the sum."""
        counts, total = list(self.counts), self.sum  # copied: the loop goes on adding
        running, buckets = 0.0, []
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets, total


class _VersionSeries:
    """One model version's request and batch series (they outlive an unload, like any counter)."""

    __slots__ = ("batch_size", "compute", "durations", "inferences", "outcomes", "queue")

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], int] = {}  # (call, outcome) -> requests
        self.durations: dict[str, _Histogram] = {}  # call -> request durations
        self.queue = _Histogram(LATENCY_BUCKETS)
        self.compute = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.inferences = 0


class VersionMetrics:
    """One model version's series, updated with a few plain additions per request.

    The request path's series (requests, durations, queue and compute time, batch sizes,
    inferences) are counts kept on the event loop and turned into Prometheus families only when
    scraped (`_RequestCollector`): prometheus_client's own counters and histograms take a lock per
    increment, six of them per request here.
    """

    def __init__(self, metrics: ServingMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self.labels = (model, version)
        self._series = metrics.series.setdefault(self.labels, _VersionSeries())
        self._providers: set[str] = set()

    def request_succeeded(self, seconds: float, queue_seconds: float, images: int) -> None:
        """One request answered: its duration, its wait for a batch and its images."""
        series = self._series
        self.request_done("success", seconds)
        series.queue.observe(queue_seconds)
        series.inferences += images

    def request_done(self, outcome: str, seconds: float) -> None:
        """Count one finished request and observe its duration, under the current call."""
        call = CALL.get()
        outcomes = self._series.outcomes
        key = (call, outcome)
        if key not in outcomes:
            # A call's first request creates all its outcome series at zero, so that error
            # ratios are 0 rather than missing.
            for known in (*OUTCOMES, outcome):
                outcomes.setdefault((call, known), 0)
            self._series.durations.setdefault(call, _Histogram(LATENCY_BUCKETS))
        outcomes[key] += 1
        self._series.durations[call].observe(seconds)

    def batch_done(self, size: int, seconds: float) -> None:
        """One batch executed: its size in images and how long it took."""
        self._series.batch_size.observe(size)
        self._series.compute.observe(seconds)

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Report queue depth and in-flight requests from these callables at scrape time."""
        self._metrics.live_owner[self.labels] = self
        self._metrics.queue_depth.labels(*self.labels).set_function(queue_depth)
        self._metrics.in_flight.labels(*self.labels).set_function(in_flight)

    def set_provider(self, provider: str) -> None:
        """Expose the execution provider in use as an info-style gauge."""
        self._metrics.provider.labels(*self.labels, provider).set(1)
        self._providers.add(provider)

    def remove(self) -> None:
        """Drop the live-state series of this version, unless a reload has taken them over."""
        if self._metrics.live_owner.get(self.labels) is not self:
            return
        del self._metrics.live_owner[self.labels]
        for family in (self._metrics.queue_depth, self._metrics.in_flight):
            with contextlib.suppress(KeyError):
                family.remove(*self.labels)
        for provider in self._providers:
            with contextlib.suppress(KeyError):
                self._metrics.provider.remove(*self.labels, provider)


class ServingMetrics:
    """Every collector the server exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        per_version = ("model", "version")
        # The request path's families: plain numbers per version, read at scrape time.
        self.series: dict[tuple[str, str], _VersionSeries] = {}
        registry.register(_RequestCollector(self.series))
        self.explain_seconds = Histogram(
            "explain_duration_seconds", "Whole Explain call: decode, model calls and drawing",
            ("model", "outcome"), namespace=NAMESPACE, registry=registry, buckets=EXPLAIN_BUCKETS,
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
            "rejected_requests", "RPCs answered with an error, by reason (a fixed set), call and "
            "model (empty where the request names none the server knows)",
            ("reason", "call", "model"), namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        for reason in REJECT_REASONS:
            self.rejected.labels(reason, "other", UNKNOWN_MODEL)
        self._models: set[str] = set()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._gpu: GpuCollector | None = None
        # Which loaded instance reports a version's live gauges: a reload hands them over.
        self.live_owner: dict[tuple[str, str], VersionMetrics] = {}

    def version(self, model: str, version: str) -> VersionMetrics:
        """Bound children for one model version."""
        return VersionMetrics(self, model, version)

    def reject(self, reason: str, call: str = "", model: str = "") -> None:
        """Count one RPC answered with an error; a model the server does not know is not a
        label value (clients choose those names)."""
        known = model if model in self._models else UNKNOWN_MODEL
        self.rejected.labels(reason, call or CALL.get(), known).inc()

    def explain_done(self, model: str, outcome: str, seconds: float) -> None:
        """Observe one whole Explain call."""
        known = model if model in self._models else UNKNOWN_MODEL
        self.explain_seconds.labels(known, outcome).observe(seconds)

    def set_model_state(self, model: str, state: str, states: Iterable[str]) -> None:
        """Mark `state` as the model's current one (1) and the others 0."""
        self._models.add(model)
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


class _RequestCollector(Collector):
    """The request path's counters and histograms, made from `_VersionSeries` at scrape time."""

    def __init__(self, series: dict[tuple[str, str], _VersionSeries]) -> None:
        self._series = series

    def collect(self) -> Iterable[Metric]:
        labels = ("model", "version")
        requests = CounterMetricFamily(
            f"{NAMESPACE}_requests", "Requests that reached a model version, by outcome and by "
            "the call they came in through", labels=(*labels, "outcome", "call"),
        )  # fmt: skip
        inferences = CounterMetricFamily(
            f"{NAMESPACE}_inferences",
            "Images (batch elements) inferred successfully",
            labels=labels,
        )
        durations = HistogramMetricFamily(
            f"{NAMESPACE}_request_duration_seconds", "Time of a request at a model version, "
            "decode to encode (for Explain: each model call, not the picture work)",
            labels=(*labels, "call"),
        )  # fmt: skip
        per_version = {
            "queue": HistogramMetricFamily(
                f"{NAMESPACE}_queue_duration_seconds",
                "Time a request waited for its batch to start", labels=labels,
            ),
            "compute": HistogramMetricFamily(
                f"{NAMESPACE}_compute_duration_seconds",
                "Time to run one batch (merge, run, split)", labels=labels,
            ),
            "batch_size": HistogramMetricFamily(
                f"{NAMESPACE}_batch_size", "Executed batch sizes, in images", labels=labels
            ),
        }  # fmt: skip
        for version, series in list(self._series.items()):
            for (call, outcome), count in list(series.outcomes.items()):
                requests.add_metric([*version, outcome, call], count)
            for call, histogram in list(series.durations.items()):
                durations.add_metric([*version, call], *histogram.sample())
            for attribute, family in per_version.items():
                family.add_metric(list(version), *getattr(series, attribute).sample())
            inferences.add_metric(list(version), series.inferences)
        return [requests, inferences, durations, *per_version.values()]


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
