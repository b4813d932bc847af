"""The README's commands run as written, and every entry point's --help names its defaults once.

Every command of the README's shell code blocks is one test case, in README order. A command is
run when a rule of RUN matches it and skipped, with the reason shown, when a pattern of SKIPPED
does (SKIPPED is consulted first); a command that neither table knows fails, so a new one cannot
slip in unseen. Commands run through bash in a sandbox directory that looks like a checkout:
the repository's files are linked in, `model_repository/` and `checkpoints/` are copies of the
session's short-trained model, the README's example inputs (`digit.png`, `scans/`) exist, and
`127.0.0.1:8001` / `:8002` point at a server this module starts on free ports.

Adding a README section: a command that can run here needs a RUN rule only if it needs a quick
form or runs in the background (a server); anything that cannot run here gets a line in SKIPPED.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.loadgen import free_port
from tests.deploy.tools import missing
from tests.support.harness import ServerThread, running_server
from tests.support.markdown_commands import (
    Command,
    code_blocks,
    help_options,
    shell_commands,
    subcommands,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# What cannot run here, and why: a regular expression matched at the start of the command's key
# (leading VAR=value words dropped, any python interpreter spelled `python`) -> the reason.
SKIPPED: dict[str, str] = {
    r"make (serve|model)\b": "installs the shared .venv and trains the default model for ~10 "
    "minutes (serve then blocks); the train, export and serve commands run below in a quick form",
    r"make (test|lint|typecheck)\b": "runs this very suite (and creates the venvs it needs)",
    r"make (venv|tools|sysdeps|clean)\b": "creates or removes venvs, installs Debian packages",
    r"make (perf|bench|zoo)\b": "measures for minutes after `make tools`/`make model`; the "
    "perf_analyzer command below runs in a quick form",
    r"make image\b|(docker|podman|buildah|nerdctl)\b": "needs a container engine",
    r"(kubectl|helm|kind|minikube)\b": "needs a Kubernetes cluster",
    r"python -m service --tls-cert\b": "needs certificates: tests/integration/test_security.py "
    "serves TLS and mutual TLS with certificates it makes",
    r"\S*(perf_analyzer|grpcurl)\b.*(-cacert|--ssl-grpc|authorization: Bearer)": "needs a TLS "
    "or token-checking server: tests/integration/test_security.py runs these flags against one",
    r"deploy/gpu-check\.sh\b": "needs a GPU host and the cnnserve:gpu image",
    r"prometheus\b": "a long-running server: tests/deploy/test_prometheus.py runs a real "
    "Prometheus with these rules against a test server",
    r"promtool (check|test) rules\b": "tests/deploy/test_prometheus.py checks and unit-tests the "
    "rules with promtool",
    r"kill -HUP\b": "signals a running server: tests/integration/test_security.py sends SIGHUP and "
    "checks that the token files are re-read",
    r"torchrun\b": "tests/training/test_training.py runs two gloo processes under torchrun with "
    "these flags and compares both ranks' weights; a second run here would double the suite's "
    "slowest step",
}


@dataclass(frozen=True)
class Plan:
    """How a command runs here."""

    serve: bool = False  # a server: started, must listen on its port, stop on SIGTERM with 0
    quick: str = ""  # appended to the command (its later flags win): the quick form
    needs: str = ""  # a file the command needs, relative to the repository; else skipped
    timeout: float = 180.0


TRAIN_QUICKLY = "--epochs 1 --max-steps 3 --test-limit 200 --threads 1 --no-plot --quiet"

# What runs, and how: the first matching rule wins; a command matching none of them (and no
# SKIPPED pattern) fails. `{grpc_port}` and `{metrics_port}` in `quick` are fresh free ports.
RUN: list[tuple[str, Plan]] = [
    (r".* --help$", Plan()),
    (r"make help$", Plan()),
    (r"python -m client\b", Plan()),
    (r"python -m service\.probe\b", Plan()),
    (
        r"python -m service\b",
        Plan(
            serve=True,
            quick="--host 127.0.0.1 --grpc-port {grpc_port} --metrics-port {metrics_port}",
        ),
    ),
    (r"python -m training\.train\b", Plan(quick=TRAIN_QUICKLY)),
    (r"python -m export\b", Plan(quick="--verify-images 8")),
    (r"\S*grpcurl\b", Plan(needs=".venv-tools/bin/grpcurl")),
    (
        r"\S*perf_analyzer\b",
        # a check that the command works, not a measurement: any spread counts as stable, and
        # 400 ms windows never come back empty on a loaded 2-core machine (250 ms did)
        Plan(
            needs=".venv-tools/bin/perf_analyzer",
            quick="--measurement-interval 400 --stability-percentage 1000 --max-trials 10",
        ),
    ),
]

# The README's example inputs, made in the sandbox from the vendored samples.
EXAMPLE_INPUTS = {
    "digit.png": "data/samples/digit0_7.png",
    "scans/digit1_2.png": "data/samples/digit1_2.png",
    "scans/letters/paper_9.jpg": "data/samples/paper_9.jpg",
}
# Paths that commands write to: copies in the sandbox, never links into the repository.
WRITTEN = ("model_repository", "checkpoints")
# After a command, the paths these flags name must exist.
OUTPUT_FLAGS = ("--out", "--out-dir", "--feature-maps", "--summary")

COMMANDS = shell_commands(README.read_text())


def plan_for(command: Command) -> Plan | str:
    """The Plan that runs a command, or the reason it is skipped; fails for an unknown command."""
    key = command.key
    for pattern, reason in SKIPPED.items():
        if re.match(pattern, key):
            return reason
    for pattern, plan in RUN:
        if re.match(pattern, key):
            return plan
    pytest.fail(
        f"{command}\nneither run nor skipped: add a rule to RUN, or a pattern and its reason to "
        f"SKIPPED, in {Path(__file__).relative_to(ROOT)}"
    )


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository, reflection=True) as thread:  # as `make serve`
        yield thread


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, mnist_repository: Path, mnist_checkpoint: Path
) -> Path:
    """A directory that looks like a checkout with a trained model, where commands may write."""
    root = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        hidden = entry.name.startswith(".") and entry.name not in (".venv", ".venv-tools")
        if not hidden and entry.name not in WRITTEN:
            (root / entry.name).symlink_to(entry)
    shutil.copytree(mnist_repository, root / "model_repository")
    (root / "checkpoints").mkdir()
    shutil.copy(mnist_checkpoint, root / "checkpoints" / mnist_checkpoint.name)
    for name, source in EXAMPLE_INPUTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, root / name)
    return root


def environment(server: ServerThread) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        PATH=os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", ""))),
        CNNSERVE_URL=server.address,
        MPLBACKEND="Agg",
        COLUMNS="100",
    )
    return env


def localize(text: str, server: ServerThread) -> str:
    """Point the README's addresses (Triton's ports 8001 and 8002) at the test server."""
    metrics = server.metrics_url.split("/")[2]
    text = re.sub(r"\b(127\.0\.0\.1|localhost|0\.0\.0\.0):8001\b", server.address, text)
    return re.sub(r"\b(127\.0\.0\.1|localhost|0\.0\.0\.0):8002\b", metrics, text)


def failure(command: Command, ran: str, rc: int | None, output: str) -> str:
    how = "did not finish" if rc is None else f"exited {rc}"
    return f"{command}\n{how}; ran `{ran}`\n{output[-4000:]}"


def run_to_completion(
    command: Command, ran: str, plan: Plan, cwd: Path, env: dict[str, str]
) -> str:
    try:
        done = subprocess.run(
            ["bash", "-c", ran],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=plan.timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(failure(command, ran, None, str(exc.output or "")))
    assert done.returncode == 0, failure(command, ran, done.returncode, done.stdout)
    return done.stdout


def serve_and_stop(command: Command, ran: str, port: int, cwd: Path, env: dict[str, str]) -> None:
    """Start a server command, wait until it listens on `port`, SIGTERM it: it must exit 0."""
    log = cwd / f"server-{command.line}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", ran],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGTERM reaches the server itself
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(failure(command, ran, process.returncode, log.read_text()))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    failure(command, ran, None, "not listening after 90 s\n" + log.read_text())
                )
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        rc = process.wait(60)
        assert rc == 0, failure(command, ran, rc, "after SIGTERM\n" + log.read_text())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line}:{c.key[:60]}" for c in COMMANDS])
def test_readme_command(command: Command, sandbox: Path, server: ServerThread) -> None:
    plan = plan_for(command)
    if isinstance(plan, str):
        pytest.skip(f"{command}: {plan}")
    if plan.needs and not (ROOT / plan.needs).exists():
        missing(f"{command}: {plan.needs} is missing (make tools installs it)")
    ports = {"grpc_port": free_port(), "metrics_port": free_port()}
    ran = localize(command.text, server)
    if plan.quick:
        ran += " " + plan.quick.format(**ports)
    env = environment(server)
    if plan.serve:
        serve_and_stop(command, ran, ports["grpc_port"], sandbox, env)
        return
    output = run_to_completion(command, ran, plan, sandbox, env)
    if command.key.endswith("--help"):
        assert_defaults_named_once(str(command), output)
    words = shlex.split(ran)
    for flag, value in itertools.pairwise(words):
        if flag in OUTPUT_FLAGS:
            path = sandbox / value
            # several explanations go to <stem>_<label><suffix> beside the --out name
            written = path.exists() or any(path.parent.glob(f"{path.stem}_*{path.suffix}"))
            assert written, f"{command}\nwrote no {value}; it said:\n{output}"


def test_readme_python_blocks_run(sandbox: Path, server: ServerThread) -> None:
    """The README's Python snippets run (tritonclient's in the tools venv, where it lives)."""
    blocks = [b for b in code_blocks(README.read_text()) if b.language in ("python", "py")]
    assert blocks, "the README shows tritonclient from Python"
    for block in blocks:
        python = Path(sys.executable)
        if "tritonclient" in block.code:
            python = ROOT / ".venv-tools" / "bin" / "python"
            if not python.exists():
                missing(f"{python} is missing: `make tools` installs tritonclient")
        done = subprocess.run(
            [str(python), "-c", localize(block.code, server)],
            cwd=sandbox,
            env=environment(server),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"README.md:{block.line}: Python block\n{done.stderr[-3000:]}"


def test_readme_shows_commands_for_each_step() -> None:
    """Guards the extraction itself: the README's main steps are found as commands."""
    keys = [c.key for c in COMMANDS]
    for expected in (
        "make serve",
        "python -m client explain",
        "python -m training.train",
        "python -m export",
        "python -m service",
        "make help",
    ):
        assert any(k.startswith(expected) for k in keys), f"no `{expected}` among {keys}"


# --- every entry point's --help ------------------------------------------------------------

# Entry points are found, not listed: every module of the project with a `__main__` guard.
# Those whose help cannot be checked here, and why; an entry point listed with a reason starting
# "known:" still runs its help and fails once it complies (then drop its line).
HELP_EXEMPT: dict[str, str] = {
    "proto/generate.py": "takes no flags: running it regenerates pb/",
    "bench/gradcam.py": "known: several options have no help text, so no default shows",
    "bench/zoo.py": "known: several options have no help text, so no default shows",
}
NOT_ENTRY_POINTS = ("tests", "pb", "build", "dist")
DEFAULT = re.compile(r"[(;]\s*default\b")


def entry_points() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0].startswith(".") or relative.parts[0] in NOT_ENTRY_POINTS:
            continue
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.MULTILINE):
            found.append(relative)
    return found


def help_text(entry: Path, *args: str) -> str:
    """`--help` of an entry point (of one of its commands with `args`), as a user runs it."""
    if (ROOT / entry.parts[0] / "__init__.py").exists():
        module = ".".join(entry.with_suffix("").parts).removesuffix(".__main__")
        argv = [sys.executable, "-m", module]
    else:
        argv = [sys.executable, str(entry)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env.update(COLUMNS="100", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [*argv, *args, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{shlex.join(argv[1:])} {' '.join(args)} --help\n{done.stderr}"
    return done.stdout


def defaults_named_once(text: str) -> list[str]:
    """What is wrong with a help text: an option whose default is named twice, or not at all."""
    problems = []
    for option in help_options(text):
        named = len(DEFAULT.findall(option.help))
        if named > 1:
            problems.append(
                f"{'/'.join(option.flags)} names its default {named} times: {option.help}"
            )
        elif named == 0 and option.takes_value and not option.required:
            problems.append(f"{'/'.join(option.flags)} names no default: {option.help}")
    return problems


def assert_defaults_named_once(what: str, text: str) -> None:
    problems = defaults_named_once(text)
    assert not problems, f"{what}\n" + "\n".join(problems)


@pytest.mark.parametrize("entry", entry_points(), ids=str)
def test_help_names_each_default_once(entry: Path) -> None:
    reason = HELP_EXEMPT.get(str(entry), "")
    if reason and not reason.startswith("known:"):
        pytest.skip(f"{entry}: {reason}")
    text = help_text(entry)
    problems = defaults_named_once(text)
    for command in subcommands(text):
        problems += [f"{command}: {p}" for p in defaults_named_once(help_text(entry, command))]
    if reason:
        assert problems, f"{entry} now names each default once: drop its line from HELP_EXEMPT"
        pytest.xfail(f"{entry}: {reason}")
    assert not problems, f"{entry} --help\n" + "\n".join(problems)


def test_help_checks_catch_repeats_and_omissions() -> None:
    """The checker itself, on argparse output with a default named twice and one never named."""
    text = """usage: x [-h] [--a A] [--b B] --c C [--flag]

options:
  -h, --help  show this help message and exit
  --a A       thing (default: the latest) (default: )
  --b B       other thing
  --c C       required, so no default
  --flag      a flag
"""
    assert [p.split(" ")[0] for p in defaults_named_once(text)] == ["--a", "--b"]


def test_extraction_reads_blocks_as_a_shell_would() -> None:
    markdown = """Text with `python -m inline --not-a-command`.

```bash
make model && docker build -t x .   # two commands; this is a comment
A=1 B="two words" .venv/bin/python -m client \\
  explain "my digit.png" --out 'a # b.png'
echo one; echo two
```

```console
$ python3 -m service --help
usage: python -m service [-h]
```

```python
print("not a shell command")
```
"""
    commands = shell_commands(markdown)
    assert [(c.line, c.text) for c in commands] == [
        (4, "make model"),
        (4, "docker build -t x ."),
        (
            5,
            'A=1 B="two words" .venv/bin/python -m client explain "my digit.png" --out \'a # b.png\'',
        ),
        (7, "echo one"),
        (7, "echo two"),
        (11, "python3 -m service --help"),
    ]
    assert commands[2].key == "python -m client explain my digit.png --out a # b.png"
    assert commands[5].key == "python -m service --help"
    assert [b.language for b in code_blocks(markdown)] == ["bash", "console", "python"]


def test_a_command_neither_run_nor_skipped_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="neither run nor skipped"):
        plan_for(Command(7, "frobnicate --all"))
    assert isinstance(plan_for(Command(8, "docker compose up")), str)
    assert isinstance(plan_for(Command(9, ".venv/bin/python -m client classify x.png")), Plan)
