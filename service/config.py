"""Server settings: one dataclass, read from `CNNSERVE_*` environment variables and CLI flags.

Every field documents itself (its help text feeds `--help`); the CLI overrides the environment,
which overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CNNSERVE_"
MiB = 1024 * 1024


def _doc(
    help: str, choices: tuple[str, ...] | None = None, name: str = "", aliases: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A field's help; `name` spells its flag and variable when the field's name does not, and
    `aliases` are older spellings still accepted (each as --flag and CNNSERVE_VARIABLE)."""
    return {"help": help, "choices": choices, "name": name, "aliases": aliases}


def _names(f: dataclasses.Field[Any]) -> tuple[str, ...]:
    """The spellings of a field's flag and variable, the preferred first."""
    return (f.metadata.get("name") or f.name, *f.metadata.get("aliases", ()))


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; see `python -m service --help`."""

    model_repository: Path = field(
        default=Path("model_repository"),
        metadata=_doc("model repository (<model>/config.pbtxt, <model>/<version>/model.onnx)"),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_doc(
            "address the gRPC server listens on (loopback only by default; 0.0.0.0 for all "
            "interfaces, as the container image sets)"
        ),
    )
    grpc_port: int = field(default=8001, metadata=_doc("gRPC port (0 picks a free one)"))
    metrics_port: int = field(
        default=8002, metadata=_doc("Prometheus /metrics port (0 picks a free one, -1 disables)")
    )
    metrics_host: str = field(
        default="",
        metadata=_doc("address the metrics server listens on (empty: the same as --host)"),
    )
    health_port: int = field(
        default=-1,
        metadata=_doc(
            "an extra plaintext port that serves only grpc.health.v1, for probes that cannot "
            "speak TLS or send a token (0 picks a free one, -1 disables)"
        ),
    )
    reflection: bool = field(
        default=False,
        metadata=_doc("serve gRPC server reflection (grpcurl needs it; off unless asked for)"),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=_doc("PEM server certificate chain: serve gRPC over TLS (needs --tls-key)"),
    )
    tls_key: Path | None = field(default=None, metadata=_doc("PEM private key of --tls-cert"))
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM CA certificates: mutual TLS, every client must present a certificate they "
            "signed (needs --tls-cert)"
        ),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "file of inference tokens, one a line: inference, metadata and explain calls need "
            "'authorization: Bearer <token>' (re-read on SIGHUP or when the file changes)"
        ),
    )
    admin_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "file of admin tokens, one a line: repository index, load and unload need one; an "
            "admin token also passes every inference check. With either token file set, admin "
            "calls need an admin token"
        ),
    )
    statistics_scope: str = field(
        default="inference",
        metadata=_doc(
            "token scope ModelStatistics needs when tokens are on (perf_analyzer reads "
            "statistics with its inference token)",
            ("inference", "admin"),
        ),
    )
    model_control_mode: str = field(
        default="none",
        metadata=_doc(
            "as Triton's: none (load every model at start; load/unload over the API refused), "
            "explicit (load/unload allowed; --load-model picks what loads at start), poll "
            "(reload new, changed and removed versions every --repository-poll-s)",
            ("none", "explicit", "poll"),
        ),
    )
    load_model: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "with --model-control-mode explicit: a model to load at start, repeatable, '*' for "
            "all (environment: comma-separated)"
        ),
    )
    repository_poll_secs: float = field(
        default=15.0,
        metadata=_doc(
            "with --model-control-mode poll: seconds between repository scans (the older "
            "CNNSERVE_REPOSITORY_POLL_SECS still works)",
            name="repository_poll_s",
            aliases=("repository_poll_secs",),
        ),
    )
    intra_op_threads: int = field(
        default=1,
        metadata=_doc("ONNX Runtime intra-op threads per session (1 is best on a shared CPU)"),
    )
    malloc_arena_max: int = field(
        default=2,
        metadata=_doc(
            "glibc malloc arenas for the process (0: glibc's default of 8 per core); few arenas "
            "keep a long-running server's memory from creeping as threads allocate in arenas of "
            "their own. MALLOC_ARENA_MAX in the environment wins"
        ),
    )
    gil_switch_s: float = field(
        default=0.0005,
        metadata=_doc(
            "how long a thread waiting for the GIL lets the running one keep it (Python's default: "
            "0.005); shorter hands a finished batch back sooner while the event loop is busy"
        ),
    )
    instances: str = field(
        default="auto",
        metadata=_doc(
            "where a CPU model instance runs its batches: process (a child process of its own, "
            "fed through /dev/shm: it never waits for the event loop's GIL, and a crash in it "
            "costs one batch, not the server), thread (a thread of the server process), or auto "
            "(process where --pin-threads gives the instances CPUs of their own, else thread); "
            "GPU instances and models with string inputs always run in threads",
            ("auto", "process", "thread"),
        ),
    )
    instance_spin_us: int = field(
        default=1000,
        metadata=_doc(
            "how long an instance process that has answered keeps polling for its next batch "
            "before it sleeps, in microseconds, where --pin-threads gives the instances CPUs of "
            "their own: a batch handed to an awake CPU starts without waking it through the "
            "hypervisor (0: sleep at once)"
        ),
    )
    latency_threads: int = field(
        default=1,
        metadata=_doc(
            "intra-op threads of the ONNX Runtime session that runs a request arriving at an "
            "idle CPU model at once, on the event loop, instead of handing it to the batch thread "
            "(the first instance's own session when this matches its thread count, else an extra "
            "one; 0: off, every request goes through the batch thread)"
        ),
    )
    pin_threads: str = field(
        default="auto",
        metadata=_doc(
            "CPU placement: on pins the event loop and gRPC's poller thread to the first CPU the "
            "process may use and the model instances and worker threads to the others (fewer "
            "cross-CPU wake-ups per RPC); auto does so on 2-4 CPUs with one worker process and "
            "one intra-op thread; off leaves every thread to the OS",
            ("auto", "on", "off"),
        ),
    )
    device: str = field(
        default="auto",
        metadata=_doc(
            "execution provider: auto (CUDA when a session really gets it, else CPU), cpu, cuda",
            ("auto", "cpu", "cuda"),
        ),
    )
    batching: str = field(
        default="eager",
        metadata=_doc(
            "eager: an idle model runs whatever is queued at once; delay: an idle model waits up "
            "to max_queue_delay_microseconds for a preferred_batch_size, like Triton",
            ("eager", "delay"),
        ),
    )
    max_message_bytes: int = field(
        default=64 * MiB,
        metadata=_doc(
            "largest gRPC message accepted or sent, in bytes (grpcio's own limit, 4 MiB, is too "
            "small for big batches)"
        ),
    )
    max_queue_bytes: int = field(
        default=256 * MiB,
        metadata=_doc(
            "per model version: bytes of request data waiting for a batch before new requests "
            "get RESOURCE_EXHAUSTED (beside the config's max_queue_size; 0: no limit)"
        ),
    )
    max_concurrent_rpcs: int = field(
        default=2048,
        metadata=_doc("RPCs the server runs at once; more get RESOURCE_EXHAUSTED (0: no limit)"),
    )
    stream_max_in_flight: int = field(
        default=128,
        metadata=_doc(
            "requests of one ModelStreamInfer stream in flight at once; at the cap the server "
            "stops reading the stream until an answer has been sent"
        ),
    )
    grace_period_s: float = field(
        default=15.0,
        metadata=_doc("seconds to finish accepted requests after SIGTERM or Ctrl-C"),
    )
    workers: int = field(
        default=1,
        metadata=_doc(
            "server processes sharing the gRPC port (SO_REUSEPORT), each with its own sessions "
            "and batchers; above 1 a supervisor restarts crashed workers and merges their "
            "metrics and statistics (helps when clients open several connections)"
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=_doc("log level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    )
    log_format: str = field(default="text", metadata=_doc("log format", ("text", "json")))
    uvloop: bool = field(
        default=True, metadata=_doc("run the event loop on uvloop when it is installed")
    )
    http_port: int = field(
        default=8000,
        metadata=_doc(
            "HTTP port of the KServe v2 REST API (Triton's default; 0 picks a free one, -1 "
            "disables)"
        ),
    )
    http_host: str = field(
        default="",
        metadata=_doc("address the HTTP API listens on (empty: the same as --host)"),
    )
    http_ui: bool = field(
        default=True,
        metadata=_doc(
            "serve the explanation page at / on the HTTP port (behind the token check when "
            "tokens are on)"
        ),
    )
    shared_memory_regions: int = field(
        default=256,
        metadata=_doc("system shared-memory regions clients may register at once (0: none)"),
    )
    trace_otlp_url: str = field(
        default="http://localhost:4318/v1/traces",
        metadata=_doc("OTLP/HTTP endpoint that receives spans under trace_mode opentelemetry"),
    )
    max_connection_idle_s: float = field(
        default=300.0,
        metadata=_doc(
            "a connection with no RPC in progress for this long is closed with GOAWAY (clients "
            "reconnect on their next call; HTTP: an idle keep-alive connection; 0: never)"
        ),
    )
    max_connection_age_s: float = field(
        default=1800.0,
        metadata=_doc(
            "a connection is sent GOAWAY after this long, however busy (bounds connections that "
            "hold streams open without sending, and spreads clients over workers; 0: never)"
        ),
    )
    max_connection_age_grace_s: float = field(
        default=30.0,
        metadata=_doc(
            "after --max-connection-age-s, how long RPCs in progress may finish before the "
            "connection is closed"
        ),
    )
    max_streams_per_connection: int = field(
        default=0,
        metadata=_doc(
            "HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; "
            "clients queue beyond it); bounds what one connection, a rapid-reset flood "
            "(CVE-2023-44487) included, can make the server do; 100 is a good value facing "
            "untrusted clients (0: gRPC's default, no limit)"
        ),
    )
    handshake_timeout_s: float = field(
        default=20.0,
        metadata=_doc(
            "a connection that has not sent its HTTP/2 preface and settings (and finished TLS) "
            "within this long is closed (gRPC's own default: 120 s); on the HTTP port, one that "
            "has not sent a whole request header by then"
        ),
    )
    worker_liveness_timeout_s: float = field(
        default=10.0,
        metadata=_doc(
            "with --workers above 1: a worker that has not answered the supervisor's liveness "
            "RPC for this long (hung, stopped, deadlocked) is killed and restarted (0: never)"
        ),
    )

    def __post_init__(self) -> None:
        for name, low in (
            ("intra_op_threads", 1),
            ("max_message_bytes", 1024),
            ("stream_max_in_flight", 1),
            ("max_queue_bytes", 0),
            ("max_concurrent_rpcs", 0),
            ("workers", 1),
            ("shared_memory_regions", 0),
            ("max_streams_per_connection", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}")
        if self.latency_threads < 0:
            raise ValueError("latency_threads must not be negative")
        if self.malloc_arena_max < 0:
            raise ValueError("malloc_arena_max must not be negative")
        if not 0 <= self.instance_spin_us <= 100_000:
            raise ValueError("instance_spin_us must be 0-100000")
        if not 0 < self.gil_switch_s <= 1:
            raise ValueError("gil_switch_s must be above 0 and at most 1")
        if self.grace_period_s < 0:
            raise ValueError("grace_period_s must not be negative")
        for name in (
            "max_connection_idle_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "handshake_timeout_s",
            "worker_liveness_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("load_model needs model_control_mode explicit")
        if not self.repository_poll_secs > 0:
            raise ValueError("repository_poll_secs must be positive")
        for name in ("statistics_scope", "model_control_mode"):
            choices = _choices(name)
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(choices)}")

    def connection_options(self) -> list[tuple[str, int]]:
        """gRPC server options for the connection limits (a limit of 0 is left out: none)."""
        limits = (
            ("grpc.max_connection_idle_ms", self.max_connection_idle_s),
            ("grpc.max_connection_age_ms", self.max_connection_age_s),
            ("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_s),
            ("grpc.server_handshake_timeout_ms", self.handshake_timeout_s),
        )
        options = [(name, max(1, round(s * 1000))) for name, s in limits if s > 0]
        if self.max_streams_per_connection:
            options.append(("grpc.max_concurrent_streams", self.max_streams_per_connection))
        return options

    @property
    def effective_http_host(self) -> str:
        """Where the HTTP API listens: --http-host, else --host."""
        return self.http_host or self.host

    @property
    def effective_metrics_host(self) -> str:
        """Where the metrics server listens: --metrics-host, else --host."""
        return self.metrics_host or self.host

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from defaults, then `environ` (CNNSERVE_*), then the flags in `argv`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            for name in _names(f):  # the preferred spelling wins over an alias
                raw = environ.get(ENV_PREFIX + name.upper())
                if raw is None:
                    continue
                try:
                    values[f.name] = _convert(f, raw)
                except ValueError as exc:
                    raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
                break
        parsed = build_parser(cls(**values)).parse_args(argv)
        for f in dataclasses.fields(cls):
            value = getattr(parsed, f.name)
            if value is None:
                continue
            if _field_type(f) is tuple:
                value = tuple(value)
            elif _optional(f):
                # `--tls-cert ''` clears a value set in the environment
                value = Path(value) if value.strip() else None
            values[f.name] = value
        return cls(**values)


def _choices(name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in dataclasses.fields(Settings) if f.name == name)


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _hint(f: dataclasses.Field[Any]) -> Any:
    return _hints()[f.name]


def _optional(f: dataclasses.Field[Any]) -> bool:
    """`X | None`: an empty value clears it."""
    return type(None) in typing.get_args(_hint(f))


def _field_type(f: dataclasses.Field[Any]) -> type:
    """The field's type without `| None`, and `tuple` for `tuple[str, ...]`."""
    hint = _hint(f)
    if _optional(f):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind: type = typing.get_origin(hint) or hint
    return kind


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f)
    if _optional(f) and not raw.strip():
        return None
    if kind is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    value = kind(raw)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return value


def build_parser(defaults: Settings | None = None) -> argparse.ArgumentParser:
    """The CLI: one flag per settings field, showing the effective default and its variable."""
    defaults = defaults or Settings()
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a model repository over the Open Inference Protocol (gRPC), with "
        "dynamic batching on ONNX Runtime, Prometheus metrics, health and reflection.",
        epilog="Each flag can also be set by the environment variable shown; flags win. "
        "SIGTERM or Ctrl-C drains: health turns NOT_SERVING, accepted requests finish.",
    )
    for f in dataclasses.fields(Settings):
        flag, *aliases = ("--" + name.replace("_", "-") for name in _names(f))
        env = ENV_PREFIX + _names(f)[0].upper()
        default = getattr(defaults, f.name)
        shown = "unset" if default in (None, (), "") else default
        help_text = f"{f.metadata['help']} (default: {shown}; env {env})"
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(
                flag, *aliases, dest=f.name, action=argparse.BooleanOptionalAction,
                default=None, help=help_text,
            )  # fmt: skip
        elif kind is tuple:
            parser.add_argument(
                flag, *aliases, dest=f.name, action="append", default=None, metavar="NAME",
                help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                flag,
                *aliases,
                dest=f.name,
                type=str if _optional(f) else kind,
                default=None,
                choices=f.metadata.get("choices"),
                metavar=None
                if kind is str
                else ("SECONDS" if kind is float else f.name.split("_")[-1].upper()),
                help=help_text,
            )
    return parser
