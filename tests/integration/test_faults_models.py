"""A model that breaks while it serves, as an operator's mistakes break it.

Under `--model-control-mode poll` and steady load, the served version's file is overwritten with
garbage, truncated, its folder deleted; a version whose graph does not fit the config is added;
stray entries appear in the model folder. The version serving keeps answering (0 errors), the
RepositoryIndex says what happened, and a later good version is picked up. A graph that fails at
run time for some inputs fails those requests' batch alone, with a clear status, and so does a
model instance process that is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from modelrepo import MODEL_FILE
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.faults import (
    channel,
    descendants,
    load,
    repository_index,
    server,
    wait_for,
)
from tests.support.harness import infer_request
from tests.support.onnx_models import (
    POISON,
    classifier_config,
    classifier_graph,
    images,
    mismatched_graph,
    poisoned_graph,
    write_model,
)

POLL_S = 0.2
CHANGED = "poll: model classifier is changed"


def rows(address: str) -> dict[str, tuple[str, str]]:
    """classifier's index rows: version -> (state, reason)."""
    return {r.version: (r.state, r.reason) for r in repository_index(address, "classifier")}


def test_a_model_broken_under_poll_keeps_serving_and_says_why(tmp_path: Path) -> None:
    model = write_model(tmp_path, classifier_config("classifier"), classifier_graph(seed=1))
    served = model / "1" / MODEL_FILE
    request = infer_request("classifier", images(1))
    with (
        server(
            tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_S)
        ) as srv,
        load(srv.address, request, clients=3, in_flight=2) as traffic,
    ):
        address = srv.address
        wait_for(lambda: traffic.answered > 20, 30, "the first answers")
        steps: list[str] = []

        def step(name: str, change: Callable[[], object], check: Callable[[], bool]) -> None:
            """Make a change; wait until a scan saw it and `check` holds; check again later."""
            scans, before, start = srv.text.count(CHANGED), traffic.sent, time.monotonic()
            change()
            wait_for(lambda: srv.text.count(CHANGED) > scans and check(), 15, name)
            took = time.monotonic() - start
            time.sleep(3 * POLL_S)  # a few more scans under load
            assert check(), (name, rows(address))
            assert not traffic.failures(), (name, traffic.first_failures())
            steps.append(f"{name}: seen in {took:.1f} s, {traffic.sent - before} requests, 0 lost")
            steps.append(f"    index: {rows(address)}")

        def reason(version: str, *words: str) -> bool:
            state, text = rows(address).get(version, ("", ""))
            return state == "READY" and all(w in text for w in words)

        step(
            "garbage over 1/model.onnx",
            lambda: served.write_bytes(b"this is not an onnx file" * 100),
            lambda: reason("1", "keeps serving", "1/model.onnx", "Protobuf parsing failed"),
        )
        step(
            "1/model.onnx truncated",
            lambda: served.write_bytes(b""),
            lambda: (
                reason("1", "keeps serving", "1/model.onnx")
                and "Protobuf" not in rows(address)["1"][1]
            ),
        )
        step(
            "folder 1/ deleted",
            lambda: shutil.rmtree(model / "1"),
            lambda: reason("1", "keeps serving", "no loadable version"),
        )
        step(
            "version 2 whose graph does not fit the config",
            lambda: write_model(
                tmp_path, classifier_config("classifier"), mismatched_graph(), versions=(2,)
            ),
            lambda: (
                rows(address).get("2", ("", ""))[0] == "UNAVAILABLE"
                and "does not fit" in rows(address)["2"][1]
                and reason("1", "keeps serving", "version 2")
            ),
        )

        def stray() -> None:
            good = classifier_graph(seed=2).SerializeToString()
            for name in ("²", "v2"):
                (model / name).mkdir()
                (model / name / MODEL_FILE).write_bytes(good)
            (model / ".git" / "1").mkdir(parents=True)
            (model / ".git" / "1" / MODEL_FILE).write_bytes(good)
            (model / "3").write_bytes(good)
            (model / "7").mkdir()

        step(
            "stray entries ²/ v2/ .git/ 3 7/",
            stray,
            lambda: set(rows(address)) == {"1", "2"} and reason("1", "keeps serving", "version 2"),
        )
        assert not any("invalid literal" in r for _, r in rows(address).values())

        write_model(tmp_path, classifier_config("classifier"), classifier_graph(seed=3), (9,))
        picked = time.monotonic()
        with channel(address) as ch:
            infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            wait_for(lambda: infer(request, timeout=10).model_version == "9", 15, "version 9")
        picked_s = time.monotonic() - picked
        steps.append(f"good version 9 added: answering after {picked_s:.1f} s")
        assert rows(address) == {"9": ("READY", "")}, rows(address)
    print()
    for line in steps:
        print("  " + line)
    print("  " + traffic.summary("ModelInfer under poll"))
    assert traffic.answered > 100 and not traffic.failures(), traffic.first_failures()


def test_a_batch_that_fails_at_run_time_fails_alone(tmp_path: Path) -> None:
    """One poisoned image makes ONNX Runtime fail its whole batch: the requests of that batch
    get INTERNAL with a generic message (no exception text), the others and the next succeed."""
    config = classifier_config(
        "poisoned", max_batch_size=8, max_queue_delay_us=100_000, preferred=(8,)
    )
    write_model(tmp_path, config, poisoned_graph())
    clean = infer_request("poisoned", images(1))
    bad = images(1)
    bad[0, 0, 14, 14] = POISON + 0.5
    poisoned = infer_request("poisoned", bad)
    outcomes: dict[str, list[str]] = {"clean": [], "poisoned": []}
    lock = threading.Lock()
    # `--batching delay`: the batcher waits for the preferred 8, so a wave is one batch (and no
    # idle fast path runs a first request alone: --latency-threads 0)
    with (
        server(tmp_path, "--batching", "delay", "--latency-threads", "0") as srv,
        channel(srv.address) as ch,
    ):
        infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        assert infer(clean, timeout=10).outputs
        for wave in range(30):
            # 7 clean requests and, in every other wave, one poisoned one, sent together so
            # the batcher puts them in the same batch when it can.
            kinds = ["clean"] * 7 + (["poisoned"] if wave % 2 else [])
            futures = [
                (kind, infer.future(poisoned if kind == "poisoned" else clean, timeout=10))
                for kind in kinds
            ]
            for kind, future in futures:
                try:
                    future.result()
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    assert exc.details() == "internal error (details are in the server log)"
                with lock:
                    outcomes[kind].append(code)
            # the next batch, alone: always answered
            assert infer(clean, timeout=10).outputs
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name="poisoned"), timeout=10
        )
        log = srv.text
    clean_failed = sum(c != "OK" for c in outcomes["clean"])
    print(
        f"\n  poisoned: sent {len(outcomes['poisoned'])}, all failed "
        f"{set(outcomes['poisoned'])}; clean: sent {len(outcomes['clean'])}, "
        f"failed {clean_failed} (those batched with a poisoned one), "
        f"{len(outcomes['clean']) - clean_failed} answered; next batch always answered"
    )
    assert set(outcomes["poisoned"]) == {"INTERNAL"}
    # the clean requests that shared a batch with a poisoned one failed with it, no others
    assert 0 < clean_failed <= 7 * 15
    # Every failure came from a batch holding a poisoned image: in each wave without one, all
    # clean requests succeeded.
    clean_waves = [outcomes["clean"][i * 7 : i * 7 + 7] for i in range(0, 30, 2)]
    assert all(code == "OK" for wave in clean_waves for code in wave)
    (version,) = stats.model_stats
    assert version.inference_stats.fail.count == len(outcomes["poisoned"]) + clean_failed
    assert len(outcomes["poisoned"]) == 15
    assert "cannot be reshaped" in log  # the cause is in the server's log, not the client's
    print(f"  server log: {log.count('Traceback')} tracebacks for {len(outcomes['poisoned'])} "
          f"poisoned requests")  # fmt: skip


def test_a_killed_instance_process_fails_its_batch_alone_and_comes_back(tmp_path: Path) -> None:
    """SIGKILL to a model's instance process under load: only the requests of the batch it was
    running fail, with UNAVAILABLE (retryable) and a message saying so; a new process takes
    over and the rest are answered; the server itself never stops."""
    write_model(tmp_path, classifier_config("classifier"), classifier_graph())
    request = infer_request("classifier", images(1))
    with (
        server(tmp_path, "--latency-threads", "0", "--instances", "process") as srv,
        load(srv.address, request, clients=3, in_flight=2) as traffic,
    ):
        wait_for(lambda: traffic.answered > 50, 30, "the first answers")

        def instances() -> list[int]:
            return [p for p, name in descendants(srv.pid).items() if name == "classifier:1-0"]

        (victim,) = instances()
        killed_at, answered = time.monotonic(), traffic.answered
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: traffic.answered > answered + 200, 60, "answers after the kill")
        replaced = instances()
        alive = srv.process.poll() is None
    failures = traffic.failures()
    # how long until an answer again: the first request sent after the kill that was answered
    back = min(o.sent + o.seconds for o in traffic.since(killed_at) if o.code == "OK") - killed_at
    print(
        f"\n  {traffic.summary()}; after the kill: {traffic.first_failures()}; answering again "
        f"{back * 1e3:.0f} ms after it"
    )
    assert back < 10
    assert alive and replaced and victim not in replaced
    assert set(failures) <= {"UNAVAILABLE"}
    assert sum(failures.values()) <= 6  # at most the batch it was running: 3 clients x 2
    finished_before = [o for o in traffic.since(0, killed_at) if o.sent + o.seconds < killed_at]
    assert finished_before and all(o.code == "OK" for o in finished_before)
    assert all("being restarted" in f for f in traffic.first_failures())
    assert "classifier:1-0: model instance process ended (signal 9); starting it again" in srv.text
