"""Triton-style per-version statistics (ModelStatistics RPC): counts and nanoseconds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .batcher import BatchRecord, BatchResult


@dataclass
class Duration:
    """A count and the nanoseconds it summed to."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """Executions of one batch size."""

    count: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class VersionStatistics:
    """Counters for one model version; every update happens on the event loop thread."""

    name: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def request_succeeded(self, ns: int, result: BatchResult, images: int) -> None:
        """Record one successful request: its total, queue and (its batch's) compute time."""
        self.success.add(ns)
        self.queue.add(result.queue_ns)
        batch = result.batch
        self.compute_input.add(batch.input_ns)
        self.compute_infer.add(batch.infer_ns)
        self.compute_output.add(batch.output_ns)
        self.inference_count += images
        self.last_inference_ms = time.time_ns() // 1_000_000

    def request_failed(self, ns: int) -> None:
        """Record one failed request."""
        self.fail.add(ns)

    def batch_executed(self, record: BatchRecord) -> None:
        """Record one executed batch by its size."""
        if record.error is not None:
            return
        self.execution_count += 1
        stats = self.batches.get(record.size)
        if stats is None:
            stats = self.batches[record.size] = BatchStats()
        stats.count += 1
        stats.input_ns += record.input_ns
        stats.infer_ns += record.infer_ns
        stats.output_ns += record.output_ns
