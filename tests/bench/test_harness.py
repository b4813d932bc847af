"""The benchmark's reference server and load harness answer and count correctly, so their figures
mean something."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench import compare, http_compare
from bench.http_compare import HEADER, binary_request, check_http
from bench.loadgen import (
    free_port,
    grpc_frame,
    h2load,
    infer_request,
    response_frame_size,
    running_process,
)
from bench.servers import executed
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    reference_logits,
    write_model,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def minimal_server(tmp_path_factory: pytest.TempPathFactory):
    repository = tmp_path_factory.mktemp("repo")
    write_model(repository, classifier_config("classifier"), classifier_graph())
    port = free_port()
    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "bench" / "minimal_server.py"), "--repository",
           str(repository), "--model", "classifier", "--port", str(port)]  # fmt: skip
    with running_process(cmd, address, "classifier"):
        yield address, repository


def concurrent_answers(address: str, repository: Path) -> None:
    """32 different images from 8 threads: each answer is its own image's logits."""
    request = infer_request(repository, "classifier")
    rng = np.random.default_rng(3)
    images = rng.random((32, 1, 28, 28), dtype=np.float32)

    def one(index: int) -> np.ndarray:
        message = pb.ModelInferRequest()
        message.CopyFrom(request)
        message.raw_input_contents[0] = images[index : index + 1].tobytes()
        reply = stub.ModelInfer(message, timeout=30)
        assert [o.name for o in reply.outputs] == ["logits", "probabilities"]
        return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with ThreadPoolExecutor(8) as pool:
            logits = np.stack(list(pool.map(one, range(len(images)))))
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="classifier"))
    np.testing.assert_allclose(logits, reference_logits(images), rtol=1e-4, atol=1e-5)
    assert metadata.inputs[0].shape == [-1, 1, 28, 28]


def test_concurrent_requests_each_get_their_own_answer(minimal_server) -> None:
    concurrent_answers(*minimal_server)


def test_the_minimal_server_with_its_model_in_a_child_process_answers_alike(
    minimal_server,
) -> None:
    """`minimal-process` (PROFILE item 31): batches through shared memory to a child process;
    the same answers, the child's threads counted with the server's (compare.py's CPU), and the
    child and its shared memory gone with the server."""
    from bench.loadgen import process_tree
    from bench.servers import server

    _, repository = minimal_server
    before = set(Path("/dev/shm").iterdir())
    with server("minimal-process", repository, "classifier") as (address, pid):
        concurrent_answers(address, repository)
        children = [p for p in process_tree(pid) if p != pid]
        assert children  # the model's process (and multiprocessing's resource tracker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(Path(f"/proc/{c}").exists() for c in children)
        or set(Path("/dev/shm").iterdir()) - before
    ):
        time.sleep(0.1)
    assert not [c for c in children if Path(f"/proc/{c}").exists()]
    assert not set(Path("/dev/shm").iterdir()) - before


def test_h2load_counts_successes_from_response_bytes(minimal_server, tmp_path: Path) -> None:
    address, repository = minimal_server
    request = infer_request(repository, "classifier")
    frame = tmp_path / "infer.grpc"
    frame.write_bytes(grpc_frame(request))
    size = response_frame_size(address, request)
    ok = h2load(address, frame, size, 4, 0.5)
    assert ok["infer_per_s"] > 0 and ok["failed"] == 0
    request.raw_input_contents[0] = b"\0" * 12  # fails: HTTP 200, grpc-status in the trailers
    frame.write_bytes(grpc_frame(request))
    bad = h2load(address, frame, size, 4, 0.5)
    assert bad["infer_per_s"] == 0 and bad["failed"] == bad["requests"] > 0


def test_h2load_over_http1_counts_only_successful_answers(tmp_path: Path) -> None:
    """compare.py's HTTP lane: the binary-extension request replayed over keep-alive HTTP/1.1."""
    repository = tmp_path / "repo"
    write_model(repository, classifier_config("classifier"), classifier_graph())
    body, header_length = binary_request(repository, "classifier")
    frame = tmp_path / "infer.http"
    frame.write_bytes(body)
    path = "/v2/models/classifier/infer"
    with http_compare.project(repository, "classifier") as (_, http_port, _):
        address = f"127.0.0.1:{http_port}"
        size = check_http(f"http://{address}{path}", body, header_length)
        headers = {HEADER: str(header_length), "content-type": "application/octet-stream"}
        ok = h2load(address, frame, size, 4, 0.5, method=path, http1_headers=headers)
        assert ok["infer_per_s"] > 0 and ok["failed"] == 0 and ok["connections"] == 4
        headers[HEADER] = str(header_length - 1)  # a header that does not parse: 400
        bad = h2load(address, frame, size, 4, 0.5, method=path, http1_headers=headers)
    assert bad["infer_per_s"] == 0 and bad["failed"] == bad["requests"] > 0


def test_compare_refuses_a_server_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt --servers name must not quietly measure the project under that label."""
    assert compare.main(["--servers", "project,tritton", "--quick"]) == 2
    assert "unknown server(s) tritton" in capsys.readouterr().err


def test_the_minimal_server_variant_runs_with_the_classic_poller(minimal_server) -> None:
    """`minimal-poller` is the minimal server with the gRPC setting `python -m service` picks,
    given through its environment (gRPC reads it at import, so nothing later would do)."""
    from bench.servers import server
    from service.grpc_env import CLASSIC_POLLER

    _, repository = minimal_server
    inherited = os.environ.get("GRPC_EXPERIMENTS")  # what the plain minimal server gets
    for name, expected in (("minimal-poller", CLASSIC_POLLER), ("minimal", inherited)):
        with server(name, repository, "classifier") as (_, pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            values = [v.split(b"=", 1)[1].decode() for v in environ
                      if v.startswith(b"GRPC_EXPERIMENTS=")]  # fmt: skip
            assert values == ([expected] if expected else []), name


def test_hotpath_measures_both_request_paths(minimal_server, tmp_path: Path) -> None:
    """bench/hotpath.py drives the project's handler and the minimal server's without gRPC."""
    import json

    from bench import hotpath

    _, repository = minimal_server
    argv = ["--repository", str(repository), "--model", "classifier", "--concurrency", "4",
            "--seconds", "0.2", "--repeat", "1", "--out", str(tmp_path)]  # fmt: skip
    assert hotpath.main(argv) == 0
    rows = json.loads((tmp_path / "hotpath.json").read_text())["rows"]
    assert sorted(r["server"] for r in rows) == ["minimal", "project"]
    for row in rows:
        assert row["requests"] > 0 and row["loop_us"] > 0 and 1 <= row["avg_batch"] <= 4


def test_executed_reads_a_server_without_statistics_as_none_counted(minimal_server) -> None:
    """compare.py asks every server for ModelStatistics; KServe has none (UNIMPLEMENTED)."""
    address, _ = minimal_server
    images, batches = executed(address, "classifier")
    assert images >= batches > 0  # the minimal server counts what it ran
    bare = grpc.server(ThreadPoolExecutor(max_workers=1))  # no services at all
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        assert executed(f"127.0.0.1:{port}", "classifier") == (0, 0)
    finally:
        bare.stop(None)


def test_the_project_is_compared_with_each_variant_on_the_same_lane() -> None:
    summary = [
        {"server": server, "lane": lane, "concurrency": c}
        for server, lane, c in [
            ("project", "unary", 16), ("project", "stream", 64), ("project-unpinned", "unary", 16),
            ("project-unpinned", "stream", 64), ("project-workers2", "unary", 16),
            ("minimal", "unary", 16), ("minimal-process", "unary", 16), ("triton", "unary", 64),
        ]
    ]  # fmt: skip
    pairs = compare.comparisons(summary)
    assert (("minimal-process", "unary", 16), ("minimal", "unary", 16)) in pairs  # the variant
    assert (("project", "unary", 16), ("minimal-process", "unary", 16)) in pairs
    assert (("project", "unary", 16), ("project-unpinned", "unary", 16)) in pairs
    assert (("project", "stream", 64), ("project-unpinned", "stream", 64)) in pairs
    assert (("project", "unary", 16), ("minimal", "unary", 16)) in pairs
    assert not [p for p in pairs if p[1][0] == "project-workers2"]  # another lane, not a variant


def test_the_summary_gives_each_point_its_spread_over_rounds() -> None:
    """The spread goal (no wider than the minimal server's) is read from compare.py's own table."""
    rounds = [
        [{"server": "project", "lane": "unary", "concurrency": 16, "infer_per_s": rate}]
        for rate in (3000.0, 2000.0, 2500.0)
    ]
    (entry,) = compare.summarise(rounds)
    assert entry["infer_per_s"]["median"] == 2500.0
    assert entry["infer_per_s"]["cv"] == pytest.approx(0.16330, abs=1e-5)  # 408.2 / 2500
    assert compare._relative_spread(entry) == "1.50x cv 0.163"
    assert compare._relative_spread({"server": "kserve"}) == ""  # a metric it lacks: blank


def test_host_noise_puts_each_window_beside_its_cpus_median() -> None:
    from bench import host_noise

    counts = {0: [100, 100, 50, 100], 1: [80, 40, 80, 80]}
    result = host_noise.summarise(counts)
    assert result["relative"][0] == [1.0, 1.0, 0.5, 1.0]
    assert result["per_cpu"][0]["lowest"] == 0.5 and result["per_cpu"][0]["highest"] == 1.0
    assert result["per_cpu"][1]["lowest"] == 0.5
    # pstdev 0.2165 over mean 0.875
    assert result["per_cpu"][0]["cv"] == pytest.approx(0.2474, abs=1e-3)
    # the dips fall in different windows: the CPUs do not move together
    assert result["correlation"]["0-1"] == pytest.approx(-1 / 3)
    steady = host_noise.summarise({0: [5, 5, 5], 1: [7, 7, 7]})  # nothing moves: no NaN
    assert steady["per_cpu"][0]["cv"] == 0 and steady["correlation"]["0-1"] == 0.0


def test_host_noise_measures_every_cpu_in_windows_that_line_up(tmp_path: Path) -> None:
    import json

    from bench import host_noise

    argv = ["--seconds", "0.4", "--window-ms", "100", "--out", str(tmp_path)]
    assert host_noise.main(argv) == 0
    document = json.loads((tmp_path / "host_noise.json").read_text())
    cpus = sorted(os.sched_getaffinity(0))
    assert sorted(document["counts"]) == [str(c) for c in cpus]
    assert all(len(v) == 4 and min(v) > 0 for v in document["counts"].values())
    assert (tmp_path / "host_noise.png").stat().st_size > 0
    assert host_noise.main(["--cpus", str(max(cpus) + 1), "--out", str(tmp_path)]) == 2


def test_spread_alternates_placements_in_one_process_and_puts_them_back(
    minimal_server, tmp_path: Path
) -> None:
    """bench/spread.py: the placements take turns in one server process, and `one-cpu` really
    holds the server to one CPU (it cannot use more than a core)."""
    import json

    from bench import spread

    _, repository = minimal_server
    argv = ["--repository", str(repository), "--model", "classifier", "--servers", "minimal",
            "--placements", "one-cpu,own", "--passes", "1", "--windows", "2", "--seconds", "0.5",
            "--concurrency", "8", "--out", str(tmp_path)]  # fmt: skip
    assert spread.main(argv) == 0
    document = json.loads((tmp_path / "spread.json").read_text())
    windows = document["windows"]
    assert [w["placement"] for w in windows] == ["one-cpu", "own", "one-cpu", "own"]
    assert all(w["infer_per_s"] > 0 and w["failed"] == 0 for w in windows)
    assert all(w["cores"] < 1.1 for w in windows if w["placement"] == "one-cpu")
    rows = {s["placement"]: s for s in document["summary"]}
    assert rows["own"]["windows"] == rows["one-cpu"]["windows"] == 2


def test_spread_refuses_what_it_does_not_know() -> None:
    from bench import spread

    with pytest.raises(SystemExit):
        spread.parse_args(["--placements", "own,two-cpus"])
    summary = spread.summarise([
        {"server": "s", "placement": "own", "infer_per_s": r, "cores": 1.0} for r in (90, 100, 120)
    ])  # fmt: skip
    assert summary[0]["median"] == 100 and summary[0]["spread"] == pytest.approx(120 / 90)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to move threads")
def test_spread_one_cpu_placement_is_undone_on_the_way_out() -> None:
    from bench import spread

    pid = os.getpid()
    own = spread.thread_cpus(pid)
    with spread.placed(pid, own, "one-cpu"):
        assert {frozenset(c) for c in spread.thread_cpus(pid).values()} == {
            frozenset({min(os.sched_getaffinity(0))})
        }
    assert spread.thread_cpus(pid) == own


def test_a_round_measures_the_servers_in_turns_and_pools_each_points_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare.py keeps a round's servers up together and cuts each point into slices that take
    turns, so that a few slow seconds of the host cost every server alike."""
    repository = tmp_path / "repo"
    write_model(repository, classifier_config("classifier"), classifier_graph())
    turns: list[tuple[str, int]] = []
    real = compare.one_slice

    def watched(target, lane, concurrency, seconds, model):  # type: ignore[no-untyped-def]
        turns.append((target.name, concurrency))
        return real(target, lane, concurrency, seconds, model)

    monkeypatch.setattr(compare, "one_slice", watched)
    out = tmp_path / "out"
    argv = ["--repository", str(repository), "--model", "classifier", "--servers",
            "project,minimal", "--concurrency", "1,4", "--stream-concurrency", "", "--repeat",
            "1", "--seconds", "1.2", "--slices", "3", "--out", str(out)]  # fmt: skip
    assert compare.main(argv) == 0
    # each level in turn; within it the servers alternate, the first one rotating every turn
    assert turns == [("project", 1), ("minimal", 1), ("minimal", 1), ("project", 1),
                     ("project", 1), ("minimal", 1), ("project", 4), ("minimal", 4),
                     ("minimal", 4), ("project", 4), ("project", 4), ("minimal", 4)]  # fmt: skip
    result = json.loads((out / "compare.json").read_text())
    (measured,) = result["rounds"]
    assert {(r["server"], r["concurrency"]) for r in measured} == {
        ("project", 1),
        ("minimal", 1),
        ("project", 4),
        ("minimal", 4),
    }
    for row in measured:
        assert row["slices"] == 3 and row["failed"] == 0 and row["infer_per_s"] > 0
        assert row["requests"] > 0.2 * row["infer_per_s"]  # about 1.2 s of them, pooled
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["server_cores"] > 0
        assert "times_ms" not in row  # the latencies are pooled, not stored
        assert row["ipis_per_infer"] >= 0
        if row["server"] == "project":  # the poller runs for every request: it is counted
            assert row["thread_ms_per_infer"]["grpc_poller"] > 0
    assert (out / "compare.png").stat().st_size > 0
    capsys.readouterr()
    assert compare.main(["--report", str(out / "compare.json")]) == 0  # read back, nothing run
    printed = capsys.readouterr().out
    assert "round 1/1\n  project: unary@1 " in printed and "  minimal: unary@1 " in printed
    assert "elasticity" in printed and len(turns) == 12


def test_a_points_slices_pool_into_rates_over_their_summed_time() -> None:
    def part(rate: float, seconds: float, latencies: list[float]) -> dict:
        return {"concurrency": 4, "connections": 1, "messages_per_stream": 1,
                "infer_per_s": rate, "seconds": seconds, "requests": int(rate * seconds),
                "failed": 0, "mean_ms": float(np.mean(latencies)), "max_ms": max(latencies),
                "times_ms": np.array(latencies), "wall": seconds, "server_cpu": 0.5 * seconds,
                "images": int(rate * seconds), "batches": int(rate * seconds / 2),
                "host_cpu": 1.0 * seconds, "client_cpu": 0.25 * seconds,
                "ipis": int(3 * rate * seconds), "threads": {"loop": 0.4 * seconds}}  # fmt: skip

    row = compare.combine([part(1000.0, 1.0, [1.0, 2.0]), part(3000.0, 3.0, [3.0, 4.0])])
    assert row["infer_per_s"] == pytest.approx(2500.0)  # 10,000 answers in 4 s, not (1000+3000)/2
    assert row["cpu_ms_per_infer"] == pytest.approx(0.2)  # 0.5 core over 2,500/s
    assert row["avg_batch"] == pytest.approx(2.0) and row["requests"] == 10_000
    assert row["p50_ms"] == pytest.approx(2.5) and row["max_ms"] == 4.0
    assert row["other_cores"] == pytest.approx(0.25)  # 1.0 busy less 0.5 server, 0.25 client
    assert row["ipis_per_infer"] == pytest.approx(3.0)
    assert row["thread_ms_per_infer"] == {"loop": pytest.approx(0.16)}  # 1.6 s over 10,000
    broken = {"concurrency": 4, "error": "h2load said no"}
    assert compare.combine([part(1000.0, 1.0, [1.0]), broken]) == broken


def test_the_one_cpu_variant_runs_the_whole_server_on_the_first_cpu(tmp_path: Path) -> None:
    """`project-one-cpu` is the project's own arrangement squeezed onto one CPU: the reference for
    how much of a figure (and of its spread) the second CPU brings."""
    from bench import servers

    repository = tmp_path / "repo"
    write_model(repository, classifier_config("classifier"), classifier_graph())
    with servers.server("project-one-cpu", repository, "classifier") as (address, pid):
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(repository, "classifier"), timeout=30)  # fmt: skip
        assert reply.outputs[0].name == "logits"
        first = min(os.sched_getaffinity(0))
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        assert tasks and all(os.sched_getaffinity(int(t.name)) == {first} for t in tasks)


def test_elasticity_says_how_much_a_series_moves_with_its_reference() -> None:
    """With the servers measured in turns, a slope above 1 is the spread goal failing for a
    reason: the series loses more than its reference when the host slows."""
    reference = [2000.0, 1600.0, 2200.0, 1800.0]
    twice = [3000.0 * (r / 2000.0) ** 2 for r in reference]
    assert compare.elasticity(list(zip(twice, reference, strict=True))) == pytest.approx(2.0)
    level = [(3000.0, r) for r in reference]  # a series that does not move at all
    assert compare.elasticity(level) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(compare.elasticity(level[:2]))  # too few rounds
    assert np.isnan(compare.elasticity([(1.0, 5.0)] * 4))  # the reference never moved


def test_spread_ratio_gives_an_interval_that_tells_wider_from_level() -> None:
    """A series that swings twice as far as its reference, round for round, reads 2.0 with an
    interval above 1; one that swings alike, 1.0 with an interval around it; too few rounds or
    a reference that never moved give no figure rather than a made-up one."""
    rng = np.random.default_rng(7)
    reference = 2000.0 * (1 + 0.08 * rng.standard_normal(16))
    wider = 3000.0 * (1 + 2 * (reference / 2000.0 - 1))
    got = compare.spread_ratio(list(zip(wider, reference, strict=True)))
    assert got is not None and got["ratio"] == pytest.approx(
        2.0 * 2000.0 / reference.mean(), rel=0.05
    )
    assert 1.0 < got["low"] <= got["ratio"] <= got["high"]
    noise = 3000.0 * (1 + 0.08 * rng.standard_normal(16))  # as wide, not moving with it
    alike = compare.spread_ratio(list(zip(noise, reference, strict=True)))
    assert alike is not None and alike["low"] < 1.0 < alike["high"]
    assert compare.spread_ratio(list(zip(wider[:3], reference[:3], strict=True))) is None
    assert compare.spread_ratio([(1.0 + i, 5.0) for i in range(6)]) is None


def test_spread_runs_reads_each_saved_run_and_tallies_how_the_runs_fell(tmp_path: Path) -> None:
    """Two saved runs: in one the project swings twice as far as the minimal server round for
    round (wider beyond doubt), in the other alike; a streaming lane and a server without the
    minimal server beside it are left out, and the tally says one wider, one level."""
    from bench import spread_runs

    rng = np.random.default_rng(3)

    def run(scale: float) -> dict:
        rounds = []
        for _ in range(12):
            host = 1 + 0.08 * rng.standard_normal()
            rounds.append([
                {"server": "minimal", "lane": "unary", "concurrency": 16,
                 "infer_per_s": 2000 * host},
                {"server": "project", "lane": "unary", "concurrency": 16,
                 "infer_per_s": 3000 * (1 + scale * (host - 1))},
                {"server": "project", "lane": "stream", "concurrency": 16, "infer_per_s": 3500},
                {"server": "triton", "lane": "unary", "concurrency": 16, "infer_per_s": 2800},
            ])  # fmt: skip
        return {"settings": {"slices": 6}, "rounds": rounds}

    paths = []
    for name, scale in (("compare-wide", 2.0), ("compare-alike", 1.0)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run(scale)))
    rows = spread_runs.rows_of(paths)
    assert [(r["run"], r["series"], r["verdict"]) for r in rows] == [
        ("compare-wide", "project", "wider"),
        ("compare-alike", "project", "level"),
    ]
    assert rows[0]["ratio"] == pytest.approx(2.0, rel=0.1)  # cv over cv: each over its own mean
    out = tmp_path / "spread.md"
    assert spread_runs.main([*map(str, paths), "--out", str(out)]) == 0
    assert "| project | 16 | 2 | " in out.read_text() and "| 0 / 1 / 1 |" in out.read_text()


PERF_SCRIPT = """\
 mnist_cnn:1-0   101 [001]   10.000000: sched:sched_switch: prev_comm=mnist_cnn:1-0 prev_pid=101 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
       swapper     0 [001]   10.000040: sched:sched_wakeup: comm=mnist_cnn:1-0 pid=101 prio=120 target_cpu=001
       swapper     0 [001]   10.000042: sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=mnist_cnn:1-0 next_pid=101 next_prio=120
        python   100 [000]   10.000050: sched:sched_switch: prev_comm=python prev_pid=100 prev_prio=120 prev_state=R ==> next_comm=h2load next_pid=7 next_prio=120
 mnist_cnn:1-0   101 [001]   10.000100: sched:sched_switch: prev_comm=mnist_cnn:1-0 prev_pid=101 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
        h2load     7 [000]   10.000120: sched:sched_switch: prev_comm=h2load prev_pid=7 prev_prio=120 prev_state=S ==> next_comm=python next_pid=100 next_prio=120
        python   100 [000]   10.000160: sched:sched_wakeup: comm=mnist_cnn:1-0 pid=101 prio=120 target_cpu=001
       swapper     0 [001]   10.000170: sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=mnist_cnn:1-0 next_pid=101 next_prio=120
 mnist_cnn:1-0   101 [001]   10.001000: sched:sched_switch: prev_comm=mnist_cnn:1-0 prev_pid=101 prev_prio=120 prev_state=R ==> next_comm=swapper/1 next_pid=0 next_prio=120
"""


def test_offcpu_reads_sleeps_wakeups_and_who_woke_whom_from_the_scheduler() -> None:
    """Two sleeps of the batch thread: one woken from its own idle CPU after 40 us, one woken by
    the loop from the other CPU after 60 us and running 10 us later; a preemption (state R) is
    no sleep; the loop, preempted once, never slept."""
    from bench import offcpu

    stats = offcpu.thread_stats(
        PERF_SCRIPT.splitlines(), {100: "python (main)", 101: "mnist_cnn:1-0"}
    )
    assert set(stats) == {101}
    batch = stats[101]
    span = 0.001
    assert batch["sleeps_per_s"] == pytest.approx(2 / span)
    assert batch["sleep_median_us"] == pytest.approx(50.0)  # 40 and 60 us
    assert batch["wake_latency_median_us"] == pytest.approx(6.0)  # 2 and 10 us
    assert batch["woken_by"] == {"swapper on CPU 1": pytest.approx(1 / span),
                                 "python (main) on CPU 0": pytest.approx(1 / span)}  # fmt: skip
    assert batch["cpus"] == {1: 2}
    ran = (0.000100 - 0.000042) + (0.001000 - 0.000170)
    assert batch["on_cpu"] == pytest.approx(ran / span)
