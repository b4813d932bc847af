"""Settings: defaults, environment variables, and CLI flags overriding them."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import Settings
from service.grpc_env import CLASSIC_POLLER


def test_defaults() -> None:
    settings = Settings.from_sources([], environ={})
    assert settings.grpc_port == 8001 and settings.metrics_port == 8002
    assert settings.max_message_bytes > 4 * 1024 * 1024
    assert settings.intra_op_threads == 1 and settings.log_format == "text"


def test_environment_then_flags() -> None:
    environ = {
        "CNNSERVE_GRPC_PORT": "9001",
        "CNNSERVE_MODEL_REPOSITORY": "/models",
        "CNNSERVE_LOG_FORMAT": "json",
        "CNNSERVE_UVLOOP": "false",
    }
    settings = Settings.from_sources([], environ=environ)
    assert settings.grpc_port == 9001 and settings.model_repository == Path("/models")
    assert settings.log_format == "json" and settings.uvloop is False
    flags = ["--grpc-port", "7001", "--log-format", "text", "--uvloop"]
    settings = Settings.from_sources(flags, environ=environ)
    assert settings.grpc_port == 7001 and settings.log_format == "text" and settings.uvloop
    assert settings.model_repository == Path("/models")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CNNSERVE_GRPC_PORT": "lots"}, "CNNSERVE_GRPC_PORT"),
        ({"CNNSERVE_LOG_FORMAT": "xml"}, "expected one of text, json"),
        ({"CNNSERVE_INTRA_OP_THREADS": "0"}, "intra_op_threads must be at least 1"),
    ],
)
def test_bad_values_are_reported(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_sources([], environ=environ)


def test_bad_flag_exits() -> None:
    with pytest.raises(SystemExit):
        Settings.from_sources(["--log-format", "xml"], environ={})


def test_safe_defaults() -> None:
    settings = Settings.from_sources([], environ={})
    assert settings.host == "127.0.0.1" and settings.effective_metrics_host == "127.0.0.1"
    assert settings.model_control_mode == "none" and settings.load_model == ()
    assert not settings.reflection and settings.health_port == -1
    assert settings.tls_cert is None and settings.auth_token_file is None


def test_security_flags_and_environment(tmp_path: Path) -> None:
    environ = {
        "CNNSERVE_LOAD_MODEL": "a, b",
        "CNNSERVE_MODEL_CONTROL_MODE": "explicit",
        "CNNSERVE_TLS_CERT": str(tmp_path / "cert.pem"),
        "CNNSERVE_TLS_KEY": str(tmp_path / "key.pem"),
        "CNNSERVE_METRICS_HOST": "0.0.0.0",
    }
    settings = Settings.from_sources([], environ=environ)
    assert settings.load_model == ("a", "b") and settings.tls_cert == tmp_path / "cert.pem"
    assert settings.effective_metrics_host == "0.0.0.0"
    flags = ["--load-model", "c", "--load-model", "*", "--tls-cert", "", "--tls-key", ""]
    settings = Settings.from_sources([*flags, "--reflection"], environ=environ)
    assert settings.load_model == ("c", "*") and settings.tls_cert is None and settings.reflection
    settings = Settings.from_sources(["--admin-token-file", "admin.txt"], environ={})
    assert settings.admin_token_file == Path("admin.txt")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "c.pem"], "tls_cert and tls_key go together"),
        (["--tls-client-ca", "ca.pem"], "needs tls_cert"),
        (["--load-model", "a"], "load_model needs model_control_mode explicit"),
        (["--model-control-mode", "poll", "--repository-poll-secs", "0"], "must be positive"),
    ],
)
def test_inconsistent_security_settings(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_sources(flags, environ={})


def test_seconds_flags_end_in_s_and_the_older_poll_spelling_still_works(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, environ in [
        (["--repository-poll-s", "2.5"], {}),
        (["--repository-poll-secs", "2.5"], {}),
        ([], {"CNNSERVE_REPOSITORY_POLL_S": "2.5"}),
        ([], {"CNNSERVE_REPOSITORY_POLL_SECS": "2.5"}),
        ([], {"CNNSERVE_REPOSITORY_POLL_S": "2.5", "CNNSERVE_REPOSITORY_POLL_SECS": "9"}),
        (["--repository-poll-s", "2.5"], {"CNNSERVE_REPOSITORY_POLL_SECS": "9"}),
    ]:
        settings = Settings.from_sources(argv, environ)
        assert settings.repository_poll_secs == 2.5, (argv, environ)
    with pytest.raises(SystemExit):
        Settings.from_sources(["--help"], {})
    flags = [
        line.split()[0]
        for line in capsys.readouterr().out.splitlines()
        if line.lstrip().startswith("--")
    ]
    timed = [f for f in flags if "secs" in f or "seconds" in f or f.endswith("-ms")]
    assert timed == [], timed  # seconds are spelled -s: --grace-period-s, --repository-poll-s


def test_max_message_bytes_help_names_one_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        Settings.from_sources(["--help"], {})
    (line,) = [
        line for line in capsys.readouterr().out.splitlines() if "largest gRPC message" in line
    ]
    assert line.count("default") == 1, line


ARENAS = """
import ctypes, sys, threading
from service.lifecycle import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])), flush=True)
def work():
    kept = [bytearray(100_000) for _ in range(20)]
    barrier.wait()
barrier = threading.Barrier(6)
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.parametrize(("limit", "most"), [(0, None), (2, 2)])
def test_malloc_arenas_are_limited_at_start(limit: int, most: int | None) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", ARENAS, str(limit)],
        capture_output=True, text=True, env=environ, timeout=60, check=True,
    )  # fmt: skip
    applied = done.stdout.strip() == "True"
    arenas = done.stderr.count("Arena ")
    if most is None:  # glibc's default: the six threads allocate in arenas of their own
        assert not applied and arenas > 2, done.stderr
    else:
        assert applied and 1 <= arenas <= most, done.stderr


def test_malloc_arena_setting() -> None:
    assert Settings.from_sources([], environ={}).malloc_arena_max == 2
    flags = ["--malloc-arena-max", "0"]
    assert Settings.from_sources(flags, environ={}).malloc_arena_max == 0
    with pytest.raises(ValueError, match="malloc_arena_max"):
        Settings.from_sources(["--malloc-arena-max", "-1"], environ={})


def test_gil_switch_interval_is_half_a_millisecond_and_bounded() -> None:
    assert Settings.from_sources([], environ={}).gil_switch_s == 0.0005
    assert Settings.from_sources(["--gil-switch-s", "0.005"], environ={}).gil_switch_s == 0.005
    for bad in ("0", "-1", "2"):
        with pytest.raises(ValueError, match="gil_switch_s"):
            Settings.from_sources(["--gil-switch-s", bad], environ={})


def test_the_interpreter_takes_the_gil_switch_interval() -> None:
    from service import lifecycle

    before, thresholds = sys.getswitchinterval(), gc.get_threshold()
    try:
        lifecycle.tune_interpreter(Settings.from_sources(["--malloc-arena-max", "0"], environ={}))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert gc.get_threshold() == (lifecycle.GC_YOUNG_THRESHOLD, *thresholds[1:])
    finally:
        sys.setswitchinterval(before)
        gc.set_threshold(*thresholds)


GRPC_IMPORT_SEES = """
import os, sys
seen = []
class Watch:  # notes the variable at the moment grpc is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS", "(unset)"))
sys.meta_path.insert(0, Watch())
import service.__main__
print(seen[0])
"""


@pytest.mark.parametrize("given", [None, "-event_engine_dns"])
def test_the_server_picks_grpcs_classic_poller_unless_told_otherwise(given: str | None) -> None:
    """grpc reads GRPC_EXPERIMENTS once, when first imported: it must be set by then; a value
    the user gave wins."""
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if given is not None:
        environ["GRPC_EXPERIMENTS"] = given
    done = subprocess.run([sys.executable, "-c", GRPC_IMPORT_SEES], capture_output=True,
                          text=True, env=environ, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == (given or CLASSIC_POLLER)
