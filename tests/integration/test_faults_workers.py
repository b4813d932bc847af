"""A worker of `--workers 2` dies (SIGKILL) or hangs (SIGSTOP) under load from several
connections: the supervisor restarts the dead one and, through its liveness check, kills and
restarts the hung one; the other worker keeps answering. Prints what was sent, answered and
lost, and how long the group took to serve on both workers again."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.faults import Traffic, load, start_server, wait_for
from tests.support.harness import infer_request
from tests.support.onnx_models import classifier_config, classifier_graph, images, write_model

GROUP_LINE = re.compile(r"(\d+) workers serving on gRPC port (\d+)")
STARTED = re.compile(r"started worker (\d+) \(pid (\d+)\)")
LIVENESS_S = 2.0
# Connections stick to the worker that accepted them: after worker 0 dies, every client is on
# worker 1. A short connection age spreads them over both workers again (GOAWAY, reconnect, the
# kernel picks a worker), so that some are on worker 0 when worker 1 hangs.
AGE_S = 3.0
CONNECTIONS = 12  # all on one worker after a spread: 2**-11


def pids(text: str) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's log."""
    return {int(m.group(1)): int(m.group(2)) for m in STARTED.finditer(text)}


def rate(traffic: Traffic, start: float, end: float) -> float:
    """Answers a second among the requests sent in [start, end)."""
    return sum(o.code == "OK" for o in traffic.since(start, end)) / (end - start)


@pytest.mark.parametrize("wait_for_ready", [True, False], ids=["wait_for_ready", "fail_fast"])
def test_a_killed_and_a_hung_worker_are_replaced_under_load(
    tmp_path: Path, wait_for_ready: bool
) -> None:
    """With wait_for_ready, a client loses only the calls in flight on the worker that died or
    hung; failing fast (gRPC's default), it also gets UNAVAILABLE for each call it makes while its
    channel reconnects."""
    write_model(tmp_path, classifier_config("classifier"), classifier_graph())
    group = start_server(
        tmp_path, "--workers", "2", "--worker-liveness-timeout-s", str(LIVENESS_S),
        "--max-connection-age-s", str(AGE_S), "--max-connection-age-grace-s", "1",
        ready_line=GROUP_LINE,
    )  # fmt: skip
    request = infer_request("classifier", images(1))
    lines: list[str] = []
    try:
        with load(
            group.address,
            request,
            clients=CONNECTIONS,
            in_flight=1,
            timeout_s=5,
            wait_for_ready=wait_for_ready,
        ) as traffic:
            wait_for(lambda: traffic.answered > 200, 30, "the first answers")
            time.sleep(1.0)
            steady = time.monotonic()
            time.sleep(2.0)
            before = rate(traffic, steady, time.monotonic())

            # 1. SIGKILL worker 0
            victim = pids(group.text)[0]
            killed = time.monotonic()
            sent_before = traffic.sent
            os.kill(victim, signal.SIGKILL)
            back = wait_for(
                lambda: (
                    pids(group.text)[0] != victim
                    and f"worker 0 (pid {pids(group.text)[0]}) is serving again" in group.text
                ),
                60,
                "worker 0 to serve again",
            )
            time.sleep(AGE_S * 1.1 + 2)  # every connection re-made at least once
            lost_kill = traffic.failures()
            lines.append(
                f"SIGKILL worker 0 (pid {victim}): serving again after {back:.1f} s; "
                f"{traffic.sent - sent_before} requests since, "
                f"{sum(lost_kill.values())} lost {dict(lost_kill)}"
            )
            assert f"worker 0 (pid {victim}) exited with code -9" in group.text

            # 2. SIGSTOP worker 1: alive, but answering nothing
            hung = pids(group.text)[1]
            failed_before = sum(traffic.failures().values())
            sent_before = traffic.sent
            stopped = time.monotonic()
            os.kill(hung, signal.SIGSTOP)
            back = wait_for(
                lambda: (
                    pids(group.text)[1] != hung
                    and f"worker 1 (pid {pids(group.text)[1]}) is serving again" in group.text
                ),
                LIVENESS_S + 60,
                "worker 1 to be replaced",
            )
            noticed = re.search(
                rf"worker 1 \(pid {hung}\) has not answered for ([\d.]+) s", group.text
            )
            assert noticed, group.text
            time.sleep(2.0)
            lost_stop = sum(traffic.failures().values()) - failed_before
            lines.append(
                f"SIGSTOP worker 1 (pid {hung}): noticed after {noticed.group(1)} s, "
                f"serving again after {back:.1f} s; {traffic.sent - sent_before} requests since, "
                f"{lost_stop} lost"
            )
            # The other worker kept answering all along: no second without answers.
            for second in range(int(time.monotonic() - killed)):
                start = killed + second
                assert rate(traffic, start, start + 1) > 0, f"no answer in second {second}"
            after = rate(traffic, time.monotonic() - 2, time.monotonic())
            lines.append(
                f"answers a second: {before:.0f} before, {after:.0f} in the last 2 s "
                f"(the clients' connections reconnected to whichever worker took them)"
            )
            total_stop = time.monotonic() - stopped
        print()
        for line in lines:
            print("  " + line)
        mode = "wait_for_ready" if wait_for_ready else "fail fast"
        print("  " + traffic.summary(f"ModelInfer over {CONNECTIONS} connections, {mode}"))
        assert total_stop < LIVENESS_S + 30
        if wait_for_ready:  # lost: only what was in flight on the dead or hung worker
            assert sum(traffic.failures().values()) <= CONNECTIONS * 2
        assert set(traffic.failures()) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
    finally:
        for pid in pids(group.text).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert group.stop(40) == 0, group.text[-3000:]
