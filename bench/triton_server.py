"""Real NVIDIA Triton (2.51, from the nvidia-pytriton wheel in .venv-triton) serving the same ONNX
file through a Python-backend model that batches with Triton's dynamic batcher.

`make triton` builds .venv-triton. `running_triton(repository, model)` lays out a Triton
repository and backend folder in a temporary directory, starts `tritonserver` (gRPC, and its
KServe v2 REST front too when given `http_port`) and yields its gRPC address and process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf import text_format

from bench.loadgen import free_port
from bench.reference_cli import latest_model
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from pb import model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
TRITON_VENV = ROOT / ".venv-triton"
SITE = TRITON_VENV / "lib" / "python3.11" / "site-packages"
TRITON_HOME = SITE / "pytriton" / "tritonserver"


def available() -> bool:
    return (TRITON_HOME / "bin" / "tritonserver").exists()


def python_libdir() -> Path:
    """lib/ of the Python 3.11 that .venv-triton was made from (the backend stub links to it)."""
    cfg = (TRITON_VENV / "pyvenv.cfg").read_text().splitlines()
    home = next(line.split("=", 1)[1].strip() for line in cfg if line.startswith("home"))
    return Path(home).parent / "lib"


def layout(workdir: Path, repository: Path, model: str) -> tuple[Path, Path]:
    """Write <workdir>/models (the Python-backend model) and <workdir>/backends; return both."""
    ours = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config = model_config_pb2.ModelConfig(
        name=model, backend="python", max_batch_size=ours.max_batch_size,
        input=ours.input, output=ours.output,
        dynamic_batching=model_config_pb2.ModelDynamicBatching(),
        instance_group=[model_config_pb2.ModelInstanceGroup(
            count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)],
    )  # fmt: skip
    version = workdir / "models" / model / "1"
    version.mkdir(parents=True)
    (workdir / "models" / model / "config.pbtxt").write_text(text_format.MessageToString(config))
    shutil.copy(latest_model(repository, model), version / "model.onnx")
    shutil.copy(Path(__file__).parent / "triton_model.py", version / "model.py")
    for labels in {t.label_filename for t in config.output if t.label_filename}:
        shutil.copy(repository / model / labels, workdir / "models" / model / labels)
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (TRITON_HOME / "backends" / "python").glob("*.*"):
        shutil.copy(item, backend)
    shutil.copy(
        TRITON_HOME / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", backend
    )
    return workdir / "models", workdir / "backends"


@contextmanager
def running_triton(
    repository: Path, model: str, http_port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start tritonserver on a free gRPC port (and HTTP on `http_port` if given); yield (gRPC
    address, process); stop it afterwards."""
    if not available():
        raise RuntimeError(f"{TRITON_HOME} is missing: run `make triton`")
    with tempfile.TemporaryDirectory(prefix="triton-") as tmp:
        models, backends = layout(Path(tmp), repository, model)
        port = free_port()
        env = {
            **os.environ,
            "PATH": f"{TRITON_VENV / 'bin'}:{os.environ['PATH']}",  # the stub's python3
            "LD_LIBRARY_PATH": f"{SITE / 'nvidia_pytriton.libs'}:{python_libdir()}",
        }
        cmd = [
            str(TRITON_HOME / "bin" / "tritonserver"), "--model-repository", str(models),
            "--backend-directory", str(backends), "--grpc-port", str(port),
            *(["--allow-http=true", "--http-port", str(http_port)] if http_port is not None
              else ["--allow-http=false"]),
            "--allow-metrics=false", "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0", "--log-verbose=0",
        ]  # fmt: skip
        log = open(Path(tmp) / "triton.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{port}"
        try:
            wait_ready(address, model, proc, Path(tmp) / "triton.log")
            yield address, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def wait_ready(address: str, model: str, proc: subprocess.Popen, log: Path) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log.read_text()[-3000:], file=sys.stderr)
                raise RuntimeError("tritonserver did not become ready")
            time.sleep(0.3)
