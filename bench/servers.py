"""Start the servers the benchmarks compare: the project, the minimal server, Triton.

A library for the bench scripts (`compare`, `profile_server`), not a script itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import triton_server
from bench.loadgen import ROOT, free_port, project_command, running_process

SERVERS = ("minimal", "triton", "project")
# Extra project configurations one can add to --servers, e.g. to test a hypothesis in the same run.
VARIANTS = {
    "project-nofastpath": ["--latency-threads", "0"],
    "project-fastpath1": ["--latency-threads", "1"],
    "project-before": [],  # needs --before: a checkout of an older commit (git worktree add)
}


@contextmanager
def server(
    name: str,
    repository: Path,
    model: str,
    server_args: str = "",
    before: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """Start one of SERVERS or VARIANTS; yield (address, pid)."""
    if name == "triton":
        with triton_server.running_triton(repository, model) as (address, proc):
            yield address, proc.pid
        return
    port = free_port()
    address = f"127.0.0.1:{port}"
    if name == "minimal":
        cmd = [sys.executable, str(ROOT / "bench" / "minimal_server.py"), "--repository",
               str(repository), "--model", model, "--port", str(port)]  # fmt: skip
    else:
        cmd = project_command(repository, port, *VARIANTS.get(name, []), *server_args.split())
        if name == "project-before":  # the same command, run from an older checkout's code
            start = f"import sys; sys.path.insert(0, {str(before)!r}); "
            start += "from service.__main__ import main; sys.exit(main())"
            cmd[1:3] = ["-c", start]
    with running_process(cmd, address, model) as proc:
        yield address, proc.pid
