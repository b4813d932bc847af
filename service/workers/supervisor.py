"""Worker processes: `--workers N` runs N servers on one gRPC port under a small supervisor.

Each worker is a whole server (its own sessions, batchers and event loop) bound to the shared port
with SO_REUSEPORT, so the kernel spreads client *connections* over the workers; one connection's
streams all land on one worker. The supervisor serves no requests. It

- reserves the port (port 0 becomes a concrete free port every worker then binds),
- starts the workers (multiprocessing, spawn) and restarts one that dies, with a backoff,
- owns the public metrics port: a scrape fetches each worker's /metrics from loopback and merges
  them under a `worker` label, metric names unchanged, so `sum by (model) (...)` adds workers up,
- forwards SIGTERM / Ctrl-C to every worker (each drains as a single server does: health
  NOT_SERVING, accepted requests finish within the grace period) and exits 0 when all exit 0.

Workers find each other through a run directory the supervisor makes: once ready, worker i
writes `worker-i.json` (pid, a private loopback gRPC port for statistics, a loopback metrics
port). ModelStatistics on any worker asks the others over that private port and sums the counts
and durations per model version, so a client sees the whole group, as from one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pb import grpc_service_pb2 as pb

from ..app import CLOSE_MARGIN_S, InferenceServer
from ..config import Settings
from ..core.errors import ServingError
from ..core.model import ServedModel
from ..core.repository import ModelRepository
from ..lifecycle import StopSignals, run, serve
from ..observability.logs import configure_logging
from ..observability.metrics import NAMESPACE
from ..rpc.statistics import statistics_message

log = logging.getLogger(__name__)

STATISTICS_METHOD = "/cnnserve.internal.Worker/LocalStatistics"
PEER_TIMEOUT_S = 2.0  # a peer that does not answer in time is left out of the sum
SCRAPE_TIMEOUT_S = 2.0
RESTART_DELAY_S = 0.5  # first restart delay; doubles per quick death, up to RESTART_MAX_S
RESTART_MAX_S = 30.0
STABLE_S = 30.0  # a worker that ran this long before dying restarts after RESTART_DELAY_S again
STOP_MARGIN_S = 10.0  # past grace + close margin, workers still running are killed


@dataclass(frozen=True)
class WorkerInfo:
    """What a ready worker publishes in the run directory."""

    index: int
    pid: int
    statistics_port: int
    metrics_port: int | None


def _info_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.json"


def publish(run_dir: Path, info: WorkerInfo) -> None:
    """Write a worker's info atomically (readers never see half a file)."""
    path = _info_path(run_dir, info.index)
    tmp = path.with_suffix(f".{info.pid}.tmp")
    tmp.write_text(json.dumps(info.__dict__))
    tmp.replace(path)


def read_info(run_dir: Path, index: int) -> WorkerInfo | None:
    """Worker `index`'s published info, or None while it has none."""
    try:
        return WorkerInfo(**json.loads(_info_path(run_dir, index).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def published(run_dir: Path) -> Iterator[WorkerInfo]:
    """Every worker info in the run directory."""
    for path in sorted(run_dir.glob("worker-*.json")):
        info = read_info(run_dir, int(path.stem.split("-")[1]))
        if info is not None:
            yield info


# ---- ModelStatistics across workers --------------------------------------------------------


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
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


# ---- the worker process --------------------------------------------------------------------


async def serve_worker(
    settings: Settings, index: int, run_dir: Path, metrics: bool, signals: StopSignals
) -> int:
    """Serve as worker `index` until SIGTERM (or the supervisor is gone), then drain."""
    peers = Peers(run_dir, index)

    async def started(server: InferenceServer) -> Callable[[], Awaitable[None]]:
        """Open the private statistics port and loopback metrics, then publish them."""
        private = grpc.aio.server()
        private.add_generic_rpc_handlers((statistics_handler(server.repository),))
        statistics_port = private.add_insecure_port("127.0.0.1:0")
        await private.start()
        httpd: Any = None
        if metrics:
            httpd, _ = start_http_server(0, addr="127.0.0.1", registry=server.metrics.registry)
        publish(
            run_dir,
            WorkerInfo(index, os.getpid(), statistics_port, httpd.server_port if httpd else None),
        )
        orphan = asyncio.create_task(_watch_parent(os.getppid(), signals))

        async def cleanup() -> None:
            orphan.cancel()
            await private.stop(0)
            await peers.close()
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()

        return cleanup

    return await serve(
        replace(settings, metrics_port=-1),
        signals,
        peer_statistics=peers.statistics,
        on_started=started,
    )


async def _watch_parent(parent: int, signals: StopSignals) -> None:
    """Drain when the supervisor is gone (killed with SIGKILL, say) instead of serving on."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    signals.stop(f"the supervisor (pid {parent}) is gone")


class _WorkerTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index  # a field of its own in JSON logs
        return True


def worker_main(settings: Settings, index: int, run_dir: Path, metrics: bool) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    # Ctrl-C in a terminal reaches the whole process group; the supervisor forwards it once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    handler = logging.getLogger().handlers[0]
    handler.addFilter(_WorkerTag(index))
    if settings.log_format == "text":
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [worker %(worker)s] %(name)s: %(message)s")
        )
    # SIGTERM only: the supervisor forwards one; a second (to the process group, say) is ignored.
    signals = StopSignals((signal.SIGTERM,))
    code = run(serve_worker(settings, index, run_dir, metrics, signals), settings.uvloop, signals)
    raise SystemExit(code)


# ---- the supervisor ------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket: it fixes port 0 to a concrete port,
    fails early when another program holds the port, and keeps it while workers restart."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Slot:
    """One worker position: the process in it now and its restart history."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    info: WorkerInfo | None = None
    quick_deaths: int = 0
    restarts: int = 0
    restart_at: float | None = None


class GroupMetrics(Collector):
    """At scrape time: every ready worker's metrics, with a `worker` label, merged by family."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self._slots = slots

    def collect(self) -> Iterable[Metric]:
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


class Supervisor:
    """Starts, watches, restarts and stops the workers of one group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [Slot(i) for i in range(settings.workers)]
        self.run_dir = Path(tempfile.mkdtemp(prefix="cnnserve-workers-"))
        self._context = multiprocessing.get_context("spawn")
        self._signals: list[int] = []
        self._worker_settings = settings

    def _spawn(self, slot: Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            _info_path(self.run_dir, slot.index).unlink()
        process = self._context.Process(
            target=worker_main,
            args=(
                self._worker_settings,
                slot.index,
                self.run_dir,
                self.settings.metrics_port >= 0,
            ),
            name=f"cnnserve-worker-{slot.index}",
        )
        process.start()
        log.info("started worker %d (pid %s)", slot.index, process.pid)
        slot.process, slot.started, slot.info, slot.restart_at = (
            process,
            time.monotonic(),
            None,
            None,
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _forward_hangup(self, signum: int, frame: object) -> None:
        """SIGHUP: each worker re-reads the token files."""
        for slot in self.slots:
            if slot.process is not None and slot.process.pid and slot.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGHUP)

    def run(self) -> int:
        """Serve until a stop signal; return 0 when every worker drained and exited cleanly."""
        settings = self.settings
        try:
            reserved = reserve_port(settings.host, settings.grpc_port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.grpc_port, exc)
            return 2
        port = reserved.getsockname()[1]
        self._worker_settings = replace(settings, grpc_port=port)
        httpd: Any = None
        metrics_port: int | None = None
        if settings.metrics_port >= 0:
            registry = CollectorRegistry()
            registry.register(GroupMetrics(self.slots))
            try:
                httpd, _ = start_http_server(
                    settings.metrics_port, addr=settings.effective_metrics_host, registry=registry
                )
            except OSError as exc:
                log.error("cannot serve metrics on port %d: %s", settings.metrics_port, exc)
                reserved.close()
                return 2
            metrics_port = httpd.server_port
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_write.fileno())
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._forward_hangup)
        try:
            return self._supervise(port, metrics_port, wake_read)
        finally:
            for signum, old in handlers.items():
                signal.signal(signum, old)
            signal.set_wakeup_fd(previous_fd)
            wake_read.close()
            wake_write.close()
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            reserved.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _supervise(self, port: int, metrics_port: int | None, wake: socket.socket) -> int:
        log.info("starting %d workers on port %d", len(self.slots), port)
        for slot in self.slots:
            self._spawn(slot)
        starting = True
        repeat_logged = False
        stop_deadline: float | None = None
        codes: dict[int, int | None] = {}
        while True:
            now = time.monotonic()
            if len(self._signals) > 1 and not repeat_logged:
                repeat_logged = True
                log.warning("another stop signal received while stopping: ignored")
            if self._signals and stop_deadline is None:
                log.info("stop signal received: draining %d workers", len(self.slots))
                stop_deadline = now + self.settings.grace_period_s + CLOSE_MARGIN_S + STOP_MARGIN_S
                self._signal_all(signal.SIGTERM)
            elif stop_deadline is not None and now > stop_deadline:
                log.warning("workers still running past the grace period: killing them")
                self._signal_all(signal.SIGKILL)
                stop_deadline = float("inf")
            for slot in self.slots:
                process = slot.process
                if process is None:
                    due = slot.restart_at is not None and now >= slot.restart_at
                    if due and stop_deadline is None:
                        slot.restarts += 1
                        self._spawn(slot)
                    continue
                if slot.info is None:
                    info = read_info(self.run_dir, slot.index)
                    if info is not None and info.pid == process.pid:
                        slot.info = info
                        if not starting:
                            log.info("worker %d (pid %d) is serving again", slot.index, info.pid)
                if process.is_alive():
                    continue
                process.join()
                code = process.exitcode
                slot.process, slot.info = None, None
                with contextlib.suppress(FileNotFoundError):
                    _info_path(self.run_dir, slot.index).unlink()
                if stop_deadline is not None:
                    codes[slot.index] = code
                    continue
                if starting:
                    log.error(
                        "worker %d could not start (exit code %s): stopping", slot.index, code
                    )
                    self._signals.append(signal.SIGTERM)
                    codes[slot.index] = code
                    stop_deadline = now + self.settings.grace_period_s + STOP_MARGIN_S
                    self._signal_all(signal.SIGTERM)
                    continue
                uptime = now - slot.started
                if uptime >= STABLE_S:
                    slot.quick_deaths = 0
                delay = min(RESTART_MAX_S, RESTART_DELAY_S * 2**slot.quick_deaths)
                slot.quick_deaths += 1
                slot.restart_at = now + delay
                log.warning(
                    "worker %d (pid %s) exited with code %s after %.1f s: restarting in %.1f s",
                    slot.index, process.pid, code, uptime, delay,
                )  # fmt: skip
            if starting and stop_deadline is None and all(s.info for s in self.slots):
                starting = False
                log.info(
                    "%d workers serving on gRPC port %d, metrics port %s",
                    len(self.slots), port, metrics_port,
                )  # fmt: skip
            alive = [s.process for s in self.slots if s.process is not None]
            if stop_deadline is not None and not alive:
                break
            pending = starting or any(s.info is None for s in self.slots)
            wait([*(p.sentinel for p in alive), wake], timeout=0.1 if pending else 1.0)
            with contextlib.suppress(BlockingIOError):
                while wake.recv(512):
                    pass
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            log.error("workers exited with errors: %s", failed)
            return max(2 if c == 2 else 1 for c in failed.values())
        log.info("all %d workers stopped", len(self.slots))
        return 0

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)


def supervise(settings: Settings) -> int:
    """Run `settings.workers` worker processes on one port until a stop signal."""
    return Supervisor(settings).run()
