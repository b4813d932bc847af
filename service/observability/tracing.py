"""Request traces as Triton writes them: settings, sampled timestamps, a JSON file or OTLP spans.

Triton's trace extension: settings `trace_level` (OFF, TIMESTAMPS; TENSORS is refused),
`trace_rate` (trace one request in N), `trace_count` (traces left to take, -1 without end),
`log_frequency` (write the file every N traces, 0: when the settings change or the server stops),
`trace_file` and `trace_mode` (triton: the JSON file; opentelemetry: spans exported over
OTLP/HTTP). Settings are global, and a model may override any of them.

A traced request collects steady-clock (CLOCK_MONOTONIC) nanosecond timestamps, the names Triton
uses: GRPC_WAITREAD_END (the request was read), REQUEST_START, QUEUE_START, COMPUTE_START,
COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END, REQUEST_END, GRPC_SEND_START. With tracing
off, `TraceControl.start` is one attribute test and returns None: the request path does nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import InvalidInput, shorten

log = logging.getLogger(__name__)

LEVEL, RATE, COUNT, FREQUENCY, FILE, MODE = (
    "trace_level",
    "trace_rate",
    "trace_count",
    "log_frequency",
    "trace_file",
    "trace_mode",
)
SETTING_NAMES = (FILE, LEVEL, RATE, COUNT, FREQUENCY, MODE)
TRITON, OPENTELEMETRY = "triton", "opentelemetry"
MAX_BUFFERED = 100_000  # traces held for the file between writes; more are dropped (logged once)
DEFAULT_OTLP_URL = "http://localhost:4318/v1/traces"


@dataclass(frozen=True)
class TraceSettings:
    """One scope's settings (Triton's names and defaults)."""

    level: tuple[str, ...] = ("OFF",)
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0
    file: str = ""
    mode: str = TRITON

    @property
    def on(self) -> bool:
        """Whether requests are traced at all."""
        return "TIMESTAMPS" in self.level and self.count != 0 and self.rate > 0

    def as_strings(self) -> dict[str, list[str]]:
        """The settings as TraceSettingResponse values."""
        return {
            FILE: [self.file],
            LEVEL: list(self.level),
            RATE: [str(self.rate)],
            COUNT: [str(self.count)],
            FREQUENCY: [str(self.log_frequency)],
            MODE: [self.mode],
        }


def _parse(base: TraceSettings, name: str, values: list[str]) -> TraceSettings:
    """`base` with one setting changed from its protocol strings."""
    if name == LEVEL:
        levels = tuple(v.upper() for v in values)
        if not levels or any(v not in ("OFF", "TIMESTAMPS", "TENSORS") for v in levels):
            raise InvalidInput(f"{LEVEL} must be OFF or TIMESTAMPS; got {values}")
        if "TENSORS" in levels:
            raise InvalidInput(f"{LEVEL} TENSORS is not supported here; use TIMESTAMPS")
        if "OFF" in levels and len(levels) > 1:
            raise InvalidInput(f"{LEVEL} OFF cannot be combined with another level")
        return replace(base, level=levels)
    if len(values) != 1:
        raise InvalidInput(f"{name} takes one value; got {len(values)}")
    value = values[0]
    if name == FILE:
        if value and ("\x00" in value or len(value) > 4096):
            raise InvalidInput(f"{FILE} is not a usable path")
        return replace(base, file=value)
    if name == MODE:
        if value not in (TRITON, OPENTELEMETRY):
            raise InvalidInput(f"{MODE} must be {TRITON} or {OPENTELEMETRY}; got {shorten(value)}")
        return replace(base, mode=value)
    try:
        number = int(value)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer; got {shorten(value)}") from None
    if name == RATE:
        if number < 1:
            raise InvalidInput(f"{RATE} must be at least 1")
        return replace(base, rate=number)
    if name == COUNT:
        if number < -1:
            raise InvalidInput(f"{COUNT} must be -1 (no limit) or at least 0")
        return replace(base, count=number)
    if name == FREQUENCY:
        if number < 0:
            raise InvalidInput(f"{FREQUENCY} must not be negative")
        return replace(base, log_frequency=number)
    raise InvalidInput(f"unknown trace setting '{shorten(name)}'")


@dataclass
class Trace:
    """One traced request: its identity and timestamps (monotonic ns), in the order taken."""

    id: int
    model_name: str
    model_version: str
    request_id: str
    mode: str
    timestamps: list[tuple[str, int]] = field(default_factory=list)

    def mark(self, name: str, ns: int | None = None) -> None:
        """Record a timestamp (now when `ns` is not given)."""
        self.timestamps.append((name, time.perf_counter_ns() if ns is None else ns))

    def batch(self, start_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """The compute timestamps of the batch this request ran in."""
        if not start_ns:
            return
        self.timestamps += [
            ("COMPUTE_START", start_ns),
            ("COMPUTE_INPUT_END", start_ns + input_ns),
            ("COMPUTE_OUTPUT_START", start_ns + input_ns + infer_ns),
            ("COMPUTE_END", start_ns + input_ns + infer_ns + output_ns),
        ]

    def to_json(self) -> list[dict[str, Any]]:
        """Triton's JSON trace entries for this request."""
        version: int | str = int(self.model_version) if self.model_version.isdigit() else -1
        head: dict[str, Any] = {
            "id": self.id,
            "model_name": self.model_name,
            "model_version": version,
        }
        if self.request_id:
            head["request_id"] = self.request_id
        stamps = [{"name": n, "ns": ns} for n, ns in sorted(self.timestamps, key=lambda t: t[1])]
        return [head, {"id": self.id, "timestamps": stamps}]


class _Sampler:
    """The rate and count state of one scope."""

    def __init__(self) -> None:
        self.seen = 0
        self.taken = 0


class TraceControl:
    """The trace settings (global and per model), the sampling, and where finished traces go."""

    def __init__(self, otlp_url: str = DEFAULT_OTLP_URL) -> None:
        self.global_settings = TraceSettings()
        self.model_settings: dict[str, dict[str, list[str]]] = {}
        self._effective: dict[str, TraceSettings] = {}
        self._samplers: dict[str, _Sampler] = {}
        self._ids = itertools.count(1)
        self._pending: dict[str, list[Trace]] = {}  # trace file -> traces not yet written
        self._file_index: dict[str, int] = {}
        self._written: set[str] = set()  # files written whole, extended by later writes
        self._dropped = 0
        self._lock = threading.Lock()
        self._otlp_url = otlp_url
        self._otel: Any = None
        self.active = False  # any scope tracing: the one test on the request path

    # settings -------------------------------------------------------------------------------

    def settings_for(self, model: str = "") -> TraceSettings:
        """The settings in force for a model ('' for the global ones)."""
        if not model:
            return self.global_settings
        return self._effective.get(model, self.global_settings)

    def update(self, model: str, changes: Mapping[str, list[str] | None]) -> TraceSettings:
        """Apply TraceSettingRequest changes (None clears a model's own value); returns them."""
        unknown = [n for n in changes if n not in SETTING_NAMES]
        if unknown:
            raise InvalidInput(
                f"unknown trace setting '{shorten(unknown[0])}'; the settings are: "
                f"{', '.join(SETTING_NAMES)}"
            )
        with self._lock:
            before = self._all_settings()
            saved = self.global_settings, dict(self.model_settings)
            if not model:
                settings = self.global_settings
                for name, values in changes.items():
                    if values is None:  # clear: back to the default
                        values = TraceSettings().as_strings()[name]
                    settings = _parse(settings, name, values)
                self.global_settings = settings
            else:
                own = dict(self.model_settings.get(model, {}))
                for name, values in changes.items():
                    if values is None:
                        own.pop(name, None)
                    else:
                        _parse(self.global_settings, name, values)  # validate now
                        own[name] = list(values)
                self.model_settings[model] = own
            self._recompute()
            after = self._all_settings()
        if any(s.on and s.mode == OPENTELEMETRY for s in after):
            try:
                self._otel_exporter()
            except InvalidInput:  # no OpenTelemetry SDK: keep the settings as they were
                with self._lock:
                    self.global_settings, self.model_settings = saved
                    self._recompute()
                raise
        if before != after:
            self.flush()  # a change of file, level or mode writes what was collected so far
        return self.settings_for(model)

    def _recompute(self) -> None:
        self._effective = {}
        for model, own in self.model_settings.items():
            settings = self.global_settings
            for name, values in own.items():
                settings = _parse(settings, name, values)
            self._effective[model] = settings
        self.active = self.global_settings.on or any(s.on for s in self._effective.values())

    def _all_settings(self) -> list[TraceSettings]:
        return [self.global_settings, *self._effective.values()]

    # the request path -------------------------------------------------------------------------

    def start(self, model: str, version: str, request_id: str, received_ns: int) -> Trace | None:
        """A new trace when this request is sampled (rate, count), else None."""
        if not self.active:
            return None
        settings = self._effective.get(model, self.global_settings)
        if not settings.on:
            return None
        scope = model if model in self._effective else ""
        with self._lock:
            sampler = self._samplers.setdefault(scope, _Sampler())
            sampler.seen += 1
            if (sampler.seen - 1) % settings.rate:
                return None
            if settings.count > 0:
                self._take_one(scope, settings)
            trace = Trace(next(self._ids), model, version, request_id, settings.mode)
        trace.mark("GRPC_WAITREAD_END", received_ns)
        return trace

    def _take_one(self, scope: str, settings: TraceSettings) -> None:
        """Count a trace against trace_count (Triton decrements the setting itself)."""
        left = str(settings.count - 1)
        if scope and COUNT in self.model_settings.get(scope, {}):
            self.model_settings[scope][COUNT] = [left]
        else:
            self.global_settings = replace(self.global_settings, count=settings.count - 1)
        self._recompute()

    def finish(self, trace: Trace) -> None:
        """A traced request is done: export its spans or keep it for the file."""
        trace.mark("GRPC_SEND_START")
        settings = self._effective.get(trace.model_name, self.global_settings)
        if trace.mode == OPENTELEMETRY:
            self._export_spans(trace)
            return
        if not settings.file:
            return
        with self._lock:
            pending = self._pending.setdefault(settings.file, [])
            if sum(len(p) for p in self._pending.values()) >= MAX_BUFFERED:
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("trace buffer full (%d traces): dropping traces", MAX_BUFFERED)
                return
            pending.append(trace)
            due = settings.log_frequency and len(pending) >= settings.log_frequency
        if due:
            self._write(settings.file, indexed=True)

    # output ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every trace collected so far (settings change, shutdown) and flush OTLP spans."""
        for path in list(self._pending):
            self._write(path, indexed=path in self._file_index)
        if self._otel is not None:
            self._otel.force_flush()

    def _write(self, path: str, indexed: bool) -> None:
        with self._lock:
            traces = self._pending.pop(path, [])
            if not traces:
                return
            target = path
            if indexed:  # log_frequency: <file>.0, <file>.1, ... as Triton names them
                index = self._file_index.get(path, 0)
                self._file_index[path] = index + 1
                target = f"{path}.{index}"
        entries = [entry for trace in traces for entry in trace.to_json()]
        try:
            if not indexed and target in self._written:  # one file for the whole run
                entries = json.loads(Path(target).read_text()) + entries
            Path(target).write_text(json.dumps(entries, indent=1))
            if not indexed:
                self._written.add(target)
        except (OSError, ValueError) as exc:
            log.warning("cannot write trace file %s: %s", target, exc)

    def _otel_exporter(self) -> Any:
        if self._otel is None:
            self._otel = OtlpExporter(self._otlp_url)
        return self._otel

    def _export_spans(self, trace: Trace) -> None:
        try:
            self._otel_exporter().export(trace)
        except Exception:
            log.exception("exporting a trace over OTLP failed")

    def close(self) -> None:
        """Write what is left and stop the exporter."""
        self.flush()
        if self._otel is not None:
            self._otel.shutdown()
            self._otel = None


class OtlpExporter:
    """Spans over OTLP/HTTP (opentelemetry-sdk): a request span, a model span, a compute span."""

    def __init__(self, url: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise InvalidInput(
                "trace_mode opentelemetry needs the 'otel' extra (opentelemetry-sdk and "
                "opentelemetry-exporter-otlp-proto-http)"
            ) from None
        self._provider = TracerProvider(resource=Resource.create({"service.name": "cnnserve"}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self._tracer = self._provider.get_tracer("cnnserve")
        # spans take wall-clock times: shift the monotonic timestamps by a fixed offset
        self._offset = time.time_ns() - time.perf_counter_ns()

    def export(self, trace: Trace) -> None:
        """Turn one trace into its spans and hand them to the batch processor."""
        from opentelemetry import trace as otel

        stamps = dict(trace.timestamps)
        wall = {name: ns + self._offset for name, ns in stamps.items()}
        attributes: dict[str, str | int] = {
            "triton.model_name": trace.model_name,
            "triton.model_version": trace.model_version,
            "triton.trace_id": trace.id,
            "triton.request_id": trace.request_id,
        }

        def span(name: str, start: str, end: str, parent: Any, events: Iterable[str]) -> Any:
            context = otel.set_span_in_context(parent) if parent is not None else None
            s = self._tracer.start_span(
                name, context=context, start_time=wall[start], attributes=attributes
            )
            for event in (start, *events, end):
                if event in wall:
                    s.add_event(event, timestamp=wall[event])
            return s

        first = "GRPC_WAITREAD_END" if "GRPC_WAITREAD_END" in wall else "REQUEST_START"
        root = span("InferRequest", first, "GRPC_SEND_START", None, ())
        model = span(trace.model_name, "REQUEST_START", "REQUEST_END", root, ("QUEUE_START",))
        if "COMPUTE_START" in wall:
            compute = span(
                "compute",
                "COMPUTE_START",
                "COMPUTE_END",
                model,
                ("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
            )
            compute.end(end_time=wall["COMPUTE_END"])
        model.end(end_time=wall.get("REQUEST_END", wall["REQUEST_START"]))
        root.end(end_time=wall.get("GRPC_SEND_START", wall[first]))

    def force_flush(self) -> None:
        """Export every ended span now."""
        self._provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self._provider.shutdown()
