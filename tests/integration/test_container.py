"""The serving image, built and run for real (buildah: no Docker engine needed), checked from outside.

Builds the Dockerfile with deploy/build-image.sh on a local Debian base (deploy/local-base.sh,
cached under /var/tmp), starts the image's own ENTRYPOINT in a container, then: tritonclient infers
and explains, the image's HEALTHCHECK command answers SERVING, /v2/health/ready answers over HTTP, the server runs as uid 10001, torch
(and pip, grpcio-tools, training code) are absent, and SIGTERM drains to exit 0 within the grace
period. buildah's chroot isolation shares the host network, so the server listens on free ports
handed in through CNNSERVE_* variables, which the HEALTHCHECK follows too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import free_port
from tests.deploy.tools import DEPLOY, ROOT, binary, missing
from tests.support.tools_venv.paths import require_tools_python

# Building an image on 2 busy cores takes minutes: more than the suite's default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BUILDAH = ["buildah", "--storage-driver", "vfs"]
TAG = "localhost/cnnserve:test"
MODEL = "mnist_cnn"
GRACE_S = 5.0
CONTEXT_FILES = (
    "Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "proto", "service", "modelrepo"
)  # fmt: skip


def build_context(repository: Path, into: Path) -> Path:
    """The build context: the files the Dockerfile copies, with `repository` as model_repository."""
    for name in CONTEXT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, into / name)
    (into / "deploy").mkdir()
    shutil.copy2(DEPLOY / "check-cuda-libs.sh", into / "deploy")
    shutil.copytree(repository, into / "model_repository")
    return into


@pytest.fixture(scope="module")
def repository(request: pytest.FixtureRequest) -> Path:
    """The model repository to bake in: CNNSERVE_TEST_REPOSITORY, else the session's trained one."""
    given = os.environ.get("CNNSERVE_TEST_REPOSITORY")
    return Path(given) if given else request.getfixturevalue("mnist_repository")


@pytest.fixture(scope="module")
def image(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    binary("buildah", "apt-get install buildah debootstrap (make sysdeps)")
    binary("debootstrap", "apt-get install debootstrap (make sysdeps)")
    if os.geteuid() != 0:
        missing("building with buildah's chroot isolation and vfs storage needs root here")
    context = build_context(repository, tmp_path_factory.mktemp("context"))
    started = time.monotonic()
    done = subprocess.run(
        [str(DEPLOY / "build-image.sh"), "-t", TAG, str(context)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "BUILDER": "buildah"},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    size_line = done.stdout.strip().splitlines()[-1]
    print(f"{size_line} (built in {time.monotonic() - started:.0f} s)")
    inspected = subprocess.run(
        [*BUILDAH, "inspect", "--type", "image", TAG], capture_output=True, text=True, check=True
    )
    config = json.loads(inspected.stdout)["Docker"]["config"]
    yield {"config": config, "size_line": size_line}
    # vfs keeps a full copy per layer: drop this build's image (the build stage stays cached).
    subprocess.run([*BUILDAH, "rmi", "-f", TAG], capture_output=True, check=False)


class Container:
    """One working container of the image, the server started with the image's ENTRYPOINT."""

    def __init__(self, config: dict[str, object]) -> None:
        self.config = config
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.marker = uuid.uuid4().hex
        self.env = {
            "CNNSERVE_GRPC_PORT": str(self.grpc_port),
            "CNNSERVE_METRICS_PORT": str(self.metrics_port),
            "CNNSERVE_HTTP_PORT": str(self.http_port),
            "CNNSERVE_GRACE_PERIOD_S": str(GRACE_S),
            "CNNSERVE_LATENCY_THREADS": "1",
            "CONTAINER_TEST_ID": self.marker,
        }
        name = f"cnnserve-test-{self.marker[:8]}"
        self.name = subprocess.run(
            [*BUILDAH, "from", "--name", name, TAG], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.log", "w+b")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def run_args(self, *command: str) -> list[str]:
        env_flags = [flag for k, v in self.env.items() for flag in ("--env", f"{k}={v}")]
        return [*BUILDAH, "run", "--isolation", "chroot", *env_flags, self.name, "--", *command]

    def start(self) -> None:
        entrypoint = [str(part) for part in self.config["Entrypoint"]]  # type: ignore[attr-defined]
        self.process = subprocess.Popen(
            self.run_args(*entrypoint), stdout=self.log, stderr=subprocess.STDOUT
        )

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.run_args(*command), capture_output=True, text=True, timeout=timeout
        )

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        test = list(self.config["Healthcheck"]["Test"])  # type: ignore[index]
        kind, command = test[0], test[1:]
        assert kind in ("CMD", "CMD-SHELL"), test
        if kind == "CMD-SHELL":
            command = ["/bin/sh", "-c", command[0]]
        return self.exec(*command, timeout=30)

    def server_pid(self) -> int:
        """The server process, found on the host by the marker in its environment."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"CONTAINER_TEST_ID={self.marker}".encode() in environ and b"service" in cmdline:
                if cmdline[0].endswith(b"buildah"):
                    continue
                return int(entry.name)
        raise LookupError("server process not found")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Killing buildah alone would orphan the server inside: stop the server first.
            with contextlib.suppress(LookupError, ProcessLookupError):
                os.kill(self.server_pid(), signal.SIGKILL)
            self.process.kill()
            self.process.wait(30)
        subprocess.run([*BUILDAH, "rm", self.name], capture_output=True, check=False)
        self.log.close()


@pytest.fixture(scope="module")
def container(image: dict[str, object]) -> Iterator[Container]:
    box = Container(image["config"])  # type: ignore[arg-type]
    try:
        box.start()
        deadline = time.monotonic() + 120
        while True:
            probe = box.healthcheck()
            if probe.returncode == 0:
                break
            assert box.process is not None and box.process.poll() is None, box.output()
            assert time.monotonic() < deadline, probe.stderr + box.output()
            time.sleep(1)
        yield box
    finally:
        box.remove()


def test_image_config(image: dict[str, object]) -> None:
    config: dict[str, object] = image["config"]  # type: ignore[assignment]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][-2:] == ["--host", "0.0.0.0"]  # type: ignore[index]
    assert {"8000/tcp", "8001/tcp", "8002/tcp"} <= set(config["ExposedPorts"])  # type: ignore[arg-type]
    assert config["StopSignal"] == "SIGTERM"
    assert "Healthcheck" in config
    size_mb = int(image["size_line"].split(": ")[1].split()[0])  # type: ignore[union-attr]
    assert size_mb < 450, image["size_line"]


def test_healthcheck_answers_serving(container: Container) -> None:
    probe = container.healthcheck()
    assert probe.returncode == 0, probe.stderr
    assert f"127.0.0.1:{container.grpc_port}: SERVING" in probe.stdout


def test_http_health_answers_from_outside(container: Container) -> None:
    # The ENTRYPOINT's --host reaches the HTTP front too: KServe v2 REST health, as httpGet probes.
    for path in ("/v2/health/ready", "/v2/health/live", f"/v2/models/{MODEL}/ready"):
        url = f"http://127.0.0.1:{container.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, path


def test_runs_as_non_root_without_training_code(container: Container) -> None:
    status = (Path("/proc") / str(container.server_pid()) / "status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert set(uids) == {"10001"} and set(gids) == {"10001"}, status
    absent = container.exec(
        "python3",
        "-c",
        "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'grpc_tools', "
        "'pip', 'training', 'export', 'onnx') if u.find_spec(m)])",
    )
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout.strip() == "[]"
    compilers = container.exec("/bin/sh", "-c", "command -v gcc cc g++ || true")
    assert compilers.stdout.strip() == ""


def test_tritonclient_infers_and_explains(
    container: Container, repository: Path, tmp_path: Path
) -> None:
    python = require_tools_python()
    script = ROOT / "tests" / "deploy" / "triton_infer_explain.py"
    done = subprocess.run(
        [str(python), str(script), f"127.0.0.1:{container.grpc_port}", MODEL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["live"] and summary["ready"] and summary["model_ready"]
    assert summary["explainer_ready"]
    assert summary["provider"] == {"string_value": "CPUExecutionProvider"}
    session = ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    images = np.load(tmp_path / "inputs.npy")
    (expected,) = session.run(["probabilities"], {"input": images})
    np.testing.assert_allclose(np.load(tmp_path / "probabilities.npy"), expected, atol=1e-5)
    cam = np.load(tmp_path / "cam.npy")
    assert cam.shape[0] == 4 and cam.size == 4 * 28 * 28 and np.isfinite(cam).all()
    assert summary["explained_class"][0] == int(expected[0].argmax())
    assert summary["explained_class"][1:] == [0, 3, 9]
    with urllib.request.urlopen(
        f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=10
    ) as response:
        metrics = response.read().decode()
    successes = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "cnnserve_requests_total"
        and sample.labels.get("model") == MODEL
        and sample.labels.get("outcome") == "success"
    ]
    assert successes and sum(successes) >= 1, metrics[-3000:]  # summed over the calls


def test_sigterm_drains_and_exits_zero(container: Container) -> None:
    # Last in the module: it stops the server. buildah would kill the process on its own
    # SIGTERM rather than forward it, so signal the server itself, as a runtime's kill does.
    pid = container.server_pid()
    assert container.process is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    code = container.process.wait(timeout=GRACE_S + 30)
    elapsed = time.monotonic() - started
    assert code == 0, container.output()
    assert elapsed < GRACE_S + 5, f"took {elapsed:.1f} s with a {GRACE_S} s grace period"
    assert "drain" in container.output()
