"""Run the real server in a background thread (its own event loop) for integration tests."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from service.app import InferenceServer, create_server
from service.config import Settings

MAX_MESSAGE = 64 * 1024 * 1024


class ServerThread:
    """A server started with `create_server` on a private event loop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server: InferenceServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            try:
                self.server = await create_server(self.settings)
            except BaseException as exc:
                self._error = exc
            finally:
                self._ready.set()

        self.loop.run_until_complete(start())
        if self._error is None:
            self.loop.run_forever()
        self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("server did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.server is not None and self.server.http is not None
        return f"http://127.0.0.1:{self.server.http.port}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )


def test_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, free ports, short grace, no uvloop."""
    base = Settings(
        model_repository=repository,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        http_port=-1,  # tests of the HTTP front ask for it (http_port=0)
        grace_period_s=5.0,
        uvloop=False,
    )
    return replace(base, **overrides)


@contextmanager
def running_server(repository: Path, **overrides: Any) -> Iterator[ServerThread]:
    """Start a server on `repository` for the duration of a with-block."""
    thread = ServerThread(test_settings(repository, **overrides)).start()
    try:
        yield thread
    finally:
        thread.stop()


def infer_request(
    model: str,
    images: Any,
    *,
    version: str = "",
    outputs: tuple[str, ...] = (),
    classification: int = 0,
    extra_inputs: dict[str, Any] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with `input` (and any extra inputs) in raw_input_contents."""
    import numpy as np

    request = pb.ModelInferRequest(model_name=model, model_version=version, id="test")
    arrays = {"input": np.ascontiguousarray(images, dtype=np.float32), **(extra_inputs or {})}
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        wanted = request.outputs.add(name=name)
        if classification:
            wanted.parameters["classification"].int64_param = classification
    return request


def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@contextmanager
def unary_load(address: str, request: pb.ModelInferRequest, clients: int) -> Iterator[Any]:
    """`clients` threads, each on its own connection, send `request` in waves of four until one
    fails or the block ends; yields a Counter of outcomes ("ok" or the status name), complete once
    the block has exited (the threads are joined then)."""
    import collections

    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options=options) as channel:
            infer = stub(channel).ModelInfer
            while not stop.is_set():
                for future in [infer.future(request, timeout=30) for _ in range(4)]:
                    try:
                        future.result()
                        outcome = "ok"
                    except grpc.RpcError as exc:
                        outcome = exc.code().name
                    with lock:
                        outcomes[outcome] += 1
                    if outcome != "ok":
                        stop.set()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
