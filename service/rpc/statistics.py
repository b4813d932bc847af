"""The ModelStatistics message of one model version's counters (`core/statistics.py`)."""

from __future__ import annotations

from pb import grpc_service_pb2 as pb

from ..core.statistics import Duration, VersionStatistics


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_message(stats: VersionStatistics) -> pb.ModelStatistics:
    """The ModelStatistics message for one version."""
    return pb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=pb.StatisticDuration(count=s.count, ns=s.input_ns),
                compute_infer=pb.StatisticDuration(count=s.count, ns=s.infer_ns),
                compute_output=pb.StatisticDuration(count=s.count, ns=s.output_ns),
            )
            for size, s in sorted(stats.batches.items())
        ],
    )
