"""Start the servers the benchmarks compare: the project, the minimal server, Triton.

A library for the bench scripts (`compare`, `profile_server`), not a script itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench import triton_server
from bench.loadgen import ROOT, free_port, project_command, running_process
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from service.grpc_env import CLASSIC_POLLER

SERVERS = ("project", "minimal", "triton", "project-workers2", "project-http-workers2")
# Project configurations one can add to --servers, e.g. to test a hypothesis in the same run.
VARIANTS = {
    "project-workers2": ["--workers", "2"],
    "project-http-workers2": ["--workers", "2"],  # driven over HTTP/1.1 (bench/compare.py)
    "project-gil5ms": ["--gil-switch-s", "0.005"],  # Python's default GIL switch interval
    "project-gil100us": ["--gil-switch-s", "0.0001"],  # PROFILE item 29: level with 0.5 ms
    "project-nofastpath": ["--latency-threads", "0"],  # the idle fast path off
    "project-fastpath2": ["--latency-threads", "2"],  # on a separate 2-thread session
    "project-processes": ["--instances", "process"],  # the default on own CPUs (PROFILE 33)
    "project-nospin": ["--instance-spin-us", "0"],  # instance processes that sleep at once
    "project-threads": ["--instances", "thread"],  # instances in threads (the default until 33)
    "project-unpinned": ["--pin-threads", "off"],  # every thread left to the OS
    "project-one-cpu": [],  # the whole process on the first CPU (taskset; see below)
    "project-eventengine": [],  # gRPC's default I/O threads (ENVIRONMENT below)
    "project-before": [],  # needs --before: a checkout of an older commit (git worktree add)
}
# Environment over the bench's own, by server: gRPC's classic poller, which the project picks
# (service/grpc_env.py), given to the minimal server to show what that setting alone gives any
# grpc.aio server; and taken from the project (an empty GRPC_EXPERIMENTS: gRPC's defaults).
ENVIRONMENT = {
    "minimal-poller": {"GRPC_EXPERIMENTS": CLASSIC_POLLER},
    "project-eventengine": {"GRPC_EXPERIMENTS": ""},
}
MINIMAL = ("minimal", "minimal-poller", "minimal-process")
# The minimal server with ONNX Runtime in a child process (bench/PROFILE.md item 31).
MINIMAL_ARGS = {"minimal-process": ["--back", "process"]}
# KServe 0.21's Python server (bench/kserve_server.py), in its own venv (`make kserve`).
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
KNOWN = tuple(dict.fromkeys((*SERVERS, *VARIANTS, *MINIMAL, "kserve")))  # every name, each once


@contextmanager
def server(
    name: str,
    repository: Path,
    model: str,
    server_args: str = "",
    before: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """Start one of SERVERS or VARIANTS; yield (address, pid)."""
    if name not in KNOWN:
        raise ValueError(f"unknown server {name!r} (known: {', '.join(KNOWN)})")
    if name == "triton":
        with triton_server.running_triton(repository, model) as (address, proc):
            yield address, proc.pid
        return
    port = free_port()
    address = f"127.0.0.1:{port}"
    if name in MINIMAL or name == "kserve":
        python, script = (
            (KSERVE_PYTHON, "kserve_server.py") if name == "kserve"
            else (Path(sys.executable), "minimal_server.py")
        )  # fmt: skip
        cmd = [str(python), str(ROOT / "bench" / script), "--repository", str(repository),
               "--model", model, "--port", str(port), *MINIMAL_ARGS.get(name, [])]  # fmt: skip
    else:
        cmd = project_command(repository, port, *VARIANTS.get(name, []), *server_args.split())
        if name == "project-before":  # the same command, run from an older checkout's code
            start = f"import sys; sys.path.insert(0, {str(before)!r}); "
            start += "from service.__main__ import main; sys.exit(main())"
            cmd[1:3] = ["-c", start]
        if name == "project-one-cpu":
            cmd = ["taskset", "--cpu-list", str(min(os.sched_getaffinity(0))), *cmd]
    with running_process(cmd, address, model, ENVIRONMENT.get(name)) as proc:
        yield address, proc.pid


def executed(address: str, model: str) -> tuple[int, int]:
    """(images, batches) executed so far, from ModelStatistics; (0, 0) from a server without it
    (KServe)."""
    with grpc.insecure_channel(address) as channel:
        try:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10).model_stats  # fmt: skip
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return 0, 0
    return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)
