"""The group's metrics: each worker's /metrics fetched from loopback at scrape time and merged
under a `worker` label, metric names unchanged, so `sum by (model) (...)` adds workers up."""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..observability.metrics import NAMESPACE
from .rundir import WorkerInfo

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0


class WorkerView(Protocol):
    """What a scrape needs of a worker position (the supervisor's `Slot`)."""

    index: int
    info: WorkerInfo | None
    restarts: int


class GroupMetrics(Collector):
    """At scrape time: every ready worker's metrics, with a `worker` label, merged by family."""

    def __init__(self, slots: Sequence[WorkerView]) -> None:
        self._slots = slots

    def collect(self) -> Iterable[Metric]:
        """Every worker's families, the `worker` label added, and the group's own gauges."""
        families: dict[str, Metric] = {}
        slots = list(self._slots)
        texts: dict[int, str | None] = {}
        threads = [
            threading.Thread(target=self._fetch, args=(s.info, texts))
            for s in slots
            if s.info is not None and s.info.metrics_port is not None
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index, text in sorted(texts.items()):
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples.extend(
                    s._replace(labels={**s.labels, "worker": str(index)}) for s in family.samples
                )
        up = Metric(f"{NAMESPACE}_worker_up", "1 when a worker answered this scrape", "gauge")
        restarts = Metric(
            f"{NAMESPACE}_worker_restarts", "Times the supervisor restarted a worker", "counter"
        )
        for slot in slots:
            labels = {"worker": str(slot.index)}
            up.add_sample(up.name, labels, 1.0 if texts.get(slot.index) else 0.0)
            restarts.add_sample(restarts.name + "_total", labels, float(slot.restarts))
        return [*families.values(), up, restarts]

    @staticmethod
    def _fetch(info: WorkerInfo, texts: dict[int, str | None]) -> None:
        url = f"http://127.0.0.1:{info.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                texts[info.index] = response.read().decode()
        except OSError as exc:
            log.debug("scraping worker %d: %s", info.index, exc)
            texts[info.index] = None
