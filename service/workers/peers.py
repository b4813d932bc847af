"""ModelStatistics across workers: a private loopback RPC per worker, and the sum over peers.

ModelStatistics on any worker asks the others over their private port (found in the run
directory) and sums the counts and durations per model version, so a client sees the whole
group, as from one server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from pb import grpc_service_pb2 as pb

from ..core.errors import ServingError
from ..core.model import ServedModel
from ..core.repository import ModelRepository
from ..rpc.statistics import statistics_message
from .rundir import published

log = logging.getLogger(__name__)

STATISTICS_METHOD = "/cnnserve.internal.Worker/LocalStatistics"
PEER_TIMEOUT_S = 2.0  # a peer that does not answer in time is left out of the sum


def _add_durations(total: Any, part: Any) -> None:
    """Add every StatisticDuration field of `part` to the same field of `total`."""
    for field, value in part.ListFields():
        if isinstance(value, pb.StatisticDuration):
            into = getattr(total, field.name)
            into.count += value.count
            into.ns += value.ns


def merge_statistics(groups: Iterable[Sequence[pb.ModelStatistics]]) -> list[pb.ModelStatistics]:
    """Sum statistics of the same model version over workers; keep the first group's order."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, pb.InferBatchStatistics]] = {}
    for group in groups:
        for stats in group:
            key = (stats.name, stats.version)
            total = merged.get(key)
            if total is None:
                total = merged[key] = pb.ModelStatistics(name=stats.name, version=stats.version)
                batches[key] = {}
            total.last_inference = max(total.last_inference, stats.last_inference)
            total.inference_count += stats.inference_count
            total.execution_count += stats.execution_count
            _add_durations(total.inference_stats, stats.inference_stats)
            for batch in stats.batch_stats:
                into = batches[key].get(batch.batch_size)
                if into is None:
                    into = batches[key][batch.batch_size] = pb.InferBatchStatistics(
                        batch_size=batch.batch_size
                    )
                _add_durations(into, batch)
            for name, response in stats.response_stats.items():
                _add_durations(total.response_stats[name], response)
    for key, total in merged.items():
        total.batch_stats.extend(b for _, b in sorted(batches[key].items()))
    return list(merged.values())


def _local_statistics(
    repository: ModelRepository[ServedModel], request: pb.ModelStatisticsRequest
) -> list[pb.ModelStatistics]:
    try:
        models = repository.serving(request.name, request.version)
    except ServingError:  # not loaded here (an unload reached only this worker): nothing to add
        return []
    return [statistics_message(m.stats) for m in models]


def statistics_handler(repository: ModelRepository[ServedModel]) -> grpc.GenericRpcHandler:
    """The private loopback service peers ask: this worker's own statistics, nothing summed."""

    async def local(
        request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(model_stats=_local_statistics(repository, request))

    service, method = STATISTICS_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: grpc.unary_unary_rpc_method_handler(
                local,
                request_deserializer=pb.ModelStatisticsRequest.FromString,
                response_serializer=pb.ModelStatisticsResponse.SerializeToString,
            )
        },
    )


class Peers:
    """The other workers of the group, found in the run directory, asked over loopback."""

    def __init__(self, run_dir: Path, index: int) -> None:
        self._run_dir = run_dir
        self._index = index
        self._channels: dict[int, grpc.aio.Channel] = {}

    async def statistics(
        self, request: pb.ModelStatisticsRequest, local: list[pb.ModelStatistics]
    ) -> list[pb.ModelStatistics]:
        """This worker's statistics plus every peer's that answers in time."""
        ports = [i.statistics_port for i in published(self._run_dir) if i.index != self._index]
        for port in set(self._channels) - set(ports):  # a restarted peer has a new port
            await self._channels.pop(port).close()
        answers = await asyncio.gather(*(self._ask(port, request) for port in ports))
        return merge_statistics([local, *(a for a in answers if a is not None)])

    async def _ask(
        self, port: int, request: pb.ModelStatisticsRequest
    ) -> list[pb.ModelStatistics] | None:
        channel = self._channels.get(port)
        if channel is None:
            channel = self._channels[port] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(
            STATISTICS_METHOD,
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        try:
            response = await call(request, timeout=PEER_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # a peer restarting or stopping: leave it out
            log.debug("statistics from the worker on port %d: %s", port, exc.code().name)
            return None
        return list(response.model_stats)

    async def close(self) -> None:
        """Close the channels to the peers."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
