"""Trace settings (global and per model), sampling, Triton's JSON trace file; log settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.core.errors import InvalidInput
from service.observability import logs
from service.observability.tracing import TraceControl


def traced(control: TraceControl, model: str = "m", n: int = 1) -> list[int]:
    """Run `n` fake requests through the trace hooks; the ids of those sampled."""
    ids = []
    for i in range(n):
        trace = control.start(model, "1", f"r{i}", 100)
        if trace is None:
            continue
        trace.mark("REQUEST_START", 110)
        trace.mark("QUEUE_START", 120)
        trace.batch(130, 5, 10, 5)
        trace.mark("REQUEST_END", 200)
        control.finish(trace)
        ids.append(trace.id)
    return ids


def test_off_by_default_and_nothing_is_traced() -> None:
    control = TraceControl()
    assert not control.active
    assert control.start("m", "1", "", 0) is None
    settings = control.settings_for("").as_strings()
    assert settings == {
        "trace_file": [""],
        "trace_level": ["OFF"],
        "trace_rate": ["1000"],
        "trace_count": ["-1"],
        "log_frequency": ["0"],
        "trace_mode": ["triton"],
    }


def test_rate_count_and_the_file_written_on_a_settings_change(tmp_path: Path) -> None:
    control = TraceControl()
    path = tmp_path / "trace.json"
    control.update(
        "", {"trace_file": [str(path)], "trace_level": ["TIMESTAMPS"], "trace_rate": ["3"]}
    )
    assert traced(control, n=7) == [1, 2, 3]  # requests 1, 4 and 7
    assert not path.exists()  # log_frequency 0: written when the settings change
    control.update("", {"trace_level": ["OFF"]})
    entries = json.loads(path.read_text())
    heads = [e for e in entries if "model_name" in e]
    assert [h["request_id"] for h in heads] == ["r0", "r3", "r6"]
    assert heads[0] == {"id": 1, "model_name": "m", "model_version": 1, "request_id": "r0"}
    stamps = next(e["timestamps"] for e in entries if "timestamps" in e and e["id"] == 1)
    assert [s["name"] for s in stamps] == [
        "GRPC_WAITREAD_END",
        "REQUEST_START",
        "QUEUE_START",
        "COMPUTE_START",
        "COMPUTE_INPUT_END",
        "COMPUTE_OUTPUT_START",
        "COMPUTE_END",
        "REQUEST_END",
        "GRPC_SEND_START",
    ]
    assert [s["ns"] for s in stamps][:7] == [100, 110, 120, 130, 135, 145, 150]

    control.update("", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["1"], "trace_count": ["2"]})
    assert len(traced(control, n=5)) == 2  # the count runs out
    assert control.settings_for("").count == 0 and not control.active
    control.flush()  # the same file grows: the first three traces are kept
    assert len([e for e in json.loads(path.read_text()) if "model_name" in e]) == 5


def test_log_frequency_writes_numbered_files(tmp_path: Path) -> None:
    control = TraceControl()
    path = tmp_path / "t.json"
    control.update(
        "",
        {
            "trace_file": [str(path)],
            "trace_level": ["TIMESTAMPS"],
            "trace_rate": ["1"],
            "log_frequency": ["2"],
        },
    )
    traced(control, n=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json.0", "t.json.1"]
    assert len(json.loads((tmp_path / "t.json.1").read_text())) == 4  # 2 traces x 2 entries
    control.close()
    assert (tmp_path / "t.json.2").exists()  # the fifth, at shutdown


def test_model_settings_override_and_clear() -> None:
    control = TraceControl()
    settings = control.update("m", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["1"]})
    assert settings.on and control.active
    assert not control.settings_for("").on and not control.settings_for("other").on
    assert traced(control, "other", 3) == [] and len(traced(control, "m", 3)) == 3
    control.update("", {"trace_rate": ["5"]})
    assert control.settings_for("m").rate == 1  # the model's own value wins
    assert control.update("m", {"trace_rate": None}).rate == 5  # cleared: the global one


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trace_level": ["TENSORS"]}, "TENSORS is not supported"),
        ({"trace_level": ["LOUD"]}, "OFF or TIMESTAMPS"),
        ({"trace_rate": ["0"]}, "at least 1"),
        ({"trace_rate": ["fast"]}, "must be an integer"),
        ({"trace_count": ["-2"]}, "-1"),
        ({"trace_mode": ["zipkin"]}, "triton or opentelemetry"),
        ({"trace_speed": ["1"]}, "unknown trace setting 'trace_speed'"),
        ({"trace_rate": ["1", "2"]}, "one value"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, list[str]], message: str) -> None:
    for model in ("", "m"):
        with pytest.raises(InvalidInput, match=message):
            TraceControl().update(model, changes)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    logs._current_format = "text"


def test_log_settings_change_at_run_time(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure_logging("INFO", "text")
    assert logs.log_settings() == {
        "log_file": "",
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "text",
    }
    now = logs.update_log_settings({"log_verbose_level": 1, "log_format": "json"})
    assert now["log_verbose_level"] == 1 and now["log_format"] == "json"
    logging.getLogger("probe").debug("visible now")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["message"] == "visible now"
    now = logs.update_log_settings({"log_verbose_level": 0, "log_info": False})
    assert logging.getLogger().level == logging.WARNING and not now["log_info"]
    for bad, message in (
        ({"log_file": "/tmp/x"}, "cannot be set"),
        ({"log_info": 1}, "takes a bool"),
        ({"log_format": "xml"}, "log_format must be"),
        ({"log_colour": True}, "unknown log setting 'log_colour'"),
    ):
        with pytest.raises(InvalidInput, match=message):
            logs.update_log_settings(bad)
