"""One served model version: its sessions behind a dynamic batcher, its statistics and metrics.

`ServedModel.infer` is the request path below the protocol: batch-first numpy arrays in, arrays
out. It knows nothing of gRPC; the servicers decode and encode around it, and the explain API
calls it with arrays directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import numpy as np

import modelrepo
from pb import model_config_pb2 as mc

from ..observability.metrics import ServingMetrics
from ..observability.tracing import Trace
from .back_process import BackSpec
from .batcher import BatchFunction, BatchRecord, BatchResult, DynamicBatcher
from .errors import InvalidInput, outcome
from .ort_options import APPLIED
from .repository import ModelFolder
from .runtime import CUDA, OnnxSession
from .signature import Signature
from .statistics import VersionStatistics

Arrays = Mapping[str, np.ndarray]


class ServedModel:
    """A loaded model version behind its dynamic batcher (made by `loading.load_version`)."""

    def __init__(
        self,
        spec: ModelFolder,
        version: int,
        sessions: list[OnnxSession],
        signature: Signature,
        metrics: ServingMetrics,
        *,
        wait_for_preferred: bool,
        max_queue_bytes: int,
        latency_session: OnnxSession | None = None,
        idle_max_size: int = 1,
        processes: Sequence[BackSpec] = (),
    ) -> None:
        """`wait_for_preferred` (`--batching delay`) and `max_queue_bytes` set up the batcher.
        With `processes`, the instances run in processes of their own and `sessions` holds the
        one this process opened to check the graph: kept only as the fast path's session."""
        self.name = spec.name
        self.version = str(version)
        self.config = spec.config
        self.signature = signature
        self.path = spec.versions[version]  # this version's model.onnx
        self.provider = sessions[0].provider
        self.applied = sessions[0].applied  # the ONNX Runtime options the sessions got
        if processes and latency_session is not sessions[0]:
            sessions = []  # the children hold the model; this copy was for the check
        self.sessions = sessions
        self.stats = VersionStatistics(self.name, self.version)
        self.metrics = metrics.version(self.name, self.version)
        self.in_flight = 0
        self.cancelled = 0  # requests whose caller went away (a client cancel, a drain's end)
        batching = spec.config.dynamic_batching
        functions: list[BatchFunction] = [] if processes else [s.run for s in sessions]
        self.instance_count = len(processes) or len(sessions)
        self.latency_session = latency_session
        self.batcher = DynamicBatcher(
            functions,
            max_batch_size=max(signature.max_batch_size, 1),
            max_queue_size=batching.default_queue_policy.max_queue_size,
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(batching.preferred_batch_size),
            wait_for_preferred=wait_for_preferred,
            on_batch=self._batch_done,
            idle_function=latency_session.run if latency_session else None,
            idle_max_size=idle_max_size,
            max_queue_bytes=max_queue_bytes,
            name=f"{self.name}:{self.version}",
            processes=processes,
        )
        self.metrics.watch(lambda: self.batcher.queue_depth, lambda: self.in_flight)
        self.metrics.set_provider(self.provider)
        if any(s.provider == CUDA for s in sessions):
            metrics.enable_gpu()

    async def infer(
        self,
        inputs: Arrays,
        batch_size: int,
        timeout_s: float | None = None,
        started_ns: int | None = None,
        trace: Trace | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one request (batch-first arrays of `batch_size` items) and return its outputs.

        Statistics and metrics count the request from `started_ns` (default: now), so a caller
        that decoded it first can include that time.
        """
        start = time.perf_counter_ns() if started_ns is None else started_ns
        self.in_flight += 1
        if trace is not None:
            trace.mark("QUEUE_START")
        try:
            # Every caller, not only the wire codec: ONNX Runtime's own error would be INTERNAL.
            missing = [n for n in self.signature.inputs_by_name if n not in inputs]
            if missing:
                raise InvalidInput(f"model '{self.name}': missing input(s): {', '.join(missing)}")
            result: BatchResult = await self.batcher.submit(inputs, batch_size, timeout_s)
        except (Exception, asyncio.CancelledError) as exc:
            self.request_failed(start, exc)
            raise
        finally:
            self.in_flight -= 1
        if trace is not None:
            b = result.batch
            trace.batch(b.start_ns, b.input_ns, b.infer_ns, b.output_ns)
        elapsed = time.perf_counter_ns() - start
        self.stats.request_succeeded(elapsed, result, batch_size)
        self.metrics.request_succeeded(elapsed / 1e9, result.queue_ns / 1e9, batch_size)
        return result.outputs

    def request_failed(self, started_ns: int, cause: BaseException) -> None:
        """Count a failed request (a refused decode as well as a failed run)."""
        _, label = outcome(cause)
        self.cancelled += isinstance(cause, asyncio.CancelledError)
        elapsed = time.perf_counter_ns() - started_ns
        self.stats.request_failed(elapsed)
        self.metrics.request_done(label, elapsed / 1e9)

    def reported_config(self) -> mc.ModelConfig:
        """The config as read, with the instances and provider the sessions really got.

        Like Triton resolving KIND_AUTO: one instance group per session, KIND_GPU or KIND_CPU.
        """
        config = mc.ModelConfig()
        config.CopyFrom(self.config)
        del config.instance_group[:]
        providers = self.batcher.instance_providers or [s.provider for s in self.sessions]
        for index, provider in enumerate(providers):
            kind = mc.ModelInstanceGroup.KIND_GPU if provider == CUDA else None
            config.instance_group.add(
                name=f"{self.name}_{index}",
                count=1,
                kind=kind if kind is not None else mc.ModelInstanceGroup.KIND_CPU,
            )
        config.parameters[modelrepo.EXECUTION_PROVIDER].string_value = self.provider
        config.parameters[APPLIED].string_value = self.applied
        return config

    def _batch_done(self, record: BatchRecord) -> None:
        self.stats.batch_executed(record)
        if record.error is None:
            compute_ns = record.input_ns + record.infer_ns + record.output_ns
            self.metrics.batch_done(record.size, compute_ns / 1e9)

    async def close(self) -> None:
        """Finish the accepted requests, then stop the batcher and drop live metrics."""
        await self.batcher.close()
        self.metrics.remove()
        # Release the ONNX Runtime sessions (memory, thread pools) at once: reference cycles
        # through callbacks would otherwise keep them until the garbage collector runs.
        self.sessions, self.latency_session = [], None
