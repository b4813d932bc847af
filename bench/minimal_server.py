"""The smallest server of the project's design, as a reference point for its per-request cost.

    .venv/bin/python bench/minimal_server.py --repository model_repository --port 8001

grpc.aio on uvloop; a batcher that never waits (whatever is queued runs as soon as ONNX Runtime
is free), up to 32 images; one ONNX Runtime session with one intra-op thread, run in a one-thread executor;
np.frombuffer in, raw_output_contents out. It answers just enough of the Open Inference Protocol
for h2load and perf_analyzer (ModelInfer, readiness, metadata, config; ModelStatistics
counts only images and batches) for one FP32 model.
No validation, statistics, metrics or deadlines: that is the point of it.

`--back process` runs ONNX Runtime in a child process instead of the executor thread: the loop
writes each batch into shared memory and a byte to a pipe, the child (one thread, its own GIL)
runs it and answers through another pipe that the loop watches. An experiment for
bench/PROFILE.md item 31: nothing in this server then waits for the GIL but the loop and gRPC's
poller.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import uvloop
from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference_cli import latest_model, reference_parser
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from pb import model_config_pb2

Batch = list[tuple[np.ndarray, asyncio.Future]]


def answer(batch: Batch, outputs: list[np.ndarray]) -> None:
    """Give each request of a batch its rows of every output."""
    start = 0
    for part, future in batch:
        end = start + len(part)
        if not future.done():
            future.set_result([out[start:end] for out in outputs])
        start = end


class EagerBatcher:
    """Queue requests; while the session is busy they pile up and run together next time."""

    def __init__(self, session: ort.InferenceSession, max_batch: int) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.queue: Batch = []
        self.running = False
        self.images = self.batches = 0  # for ModelStatistics: the average executed batch

    def submit(self, x: np.ndarray) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((x, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return future

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x})

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
                x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
                self.images, self.batches = self.images + len(x), self.batches + 1
                try:
                    y = await loop.run_in_executor(self.executor, self._run, x)
                except Exception as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                answer(batch, y)
        finally:
            self.running = False


def open_session(model_file: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _back(model_file: Path, inputs: str, outputs: str, names: list[str], requests: Connection,
          answers: Connection) -> None:  # fmt: skip
    """(The child of ProcessBatcher) run each batch the loop announces, answer when done."""
    session = open_session(model_file)
    spec = session.get_inputs()[0]
    image = tuple(spec.shape[1:])
    shm_in, shm_out = SharedMemory(inputs), SharedMemory(outputs)
    while True:
        try:
            n = int.from_bytes(requests.recv_bytes(), "little")
        except EOFError:  # the server is gone; the OS takes the rest
            return
        x = np.ndarray((n, *image), np.float32, shm_in.buf)
        offset = 0
        for y in session.run(names, {spec.name: x}):
            shm_out.buf[offset : offset + y.nbytes] = y.astype(np.float32).tobytes()
            offset += y.nbytes
        answers.send_bytes(b"\x01")


class ProcessBatcher:
    """EagerBatcher's queue with ONNX Runtime in a child process: batches go through shared
    memory, and the loop learns of each answer from a pipe it watches (no thread but the loop
    and gRPC's poller needs this process's GIL)."""

    def __init__(self, model_file: Path, config: model_config_pb2.ModelConfig,
                 max_batch: int) -> None:  # fmt: skip
        self.max_batch = max_batch
        self.image = tuple(config.input[0].dims)
        self.outputs = [tuple(t.dims) for t in config.output]
        in_bytes = 4 * max_batch * int(np.prod(self.image))
        out_bytes = 4 * max_batch * sum(int(np.prod(d)) for d in self.outputs)
        self.shm_in = SharedMemory(create=True, size=in_bytes)
        self.shm_out = SharedMemory(create=True, size=out_bytes)
        context = multiprocessing.get_context("spawn")
        child_requests, self.requests = context.Pipe(duplex=False)  # (reader, writer)
        self.answers, child_answers = context.Pipe(duplex=False)
        self.child = context.Process(target=_back, daemon=True, args=(
            model_file, self.shm_in.name, self.shm_out.name, [t.name for t in config.output],
            child_requests, child_answers))  # fmt: skip
        self.child.start()
        self.queue: Batch = []
        self.batch: Batch = []  # the one the child runs
        self.batch_images = 0
        self.images = self.batches = 0
        self.watching = False

    def submit(self, x: np.ndarray) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if not self.watching:
            loop.add_reader(self.answers.fileno(), self._answered)
            self.watching = True
        future = loop.create_future()
        self.queue.append((x, future))
        if not self.batch:
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        self.batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
        n = self.batch_images = sum(len(x) for x, _ in self.batch)
        np.concatenate([x for x, _ in self.batch], out=np.ndarray(
            (n, *self.image), np.float32, self.shm_in.buf))  # fmt: skip
        self.images, self.batches = self.images + n, self.batches + 1
        self.requests.send_bytes(n.to_bytes(4, "little"))

    def _answered(self) -> None:
        self.answers.recv_bytes()
        ys, offset = [], 0
        for dims in self.outputs:
            y = np.ndarray((self.batch_images, *dims), np.float32, self.shm_out.buf, offset)
            ys.append(y.copy())
            offset += y.nbytes
        answer(self.batch, ys)
        self.batch = []
        if self.queue:
            self._dispatch()


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, config: model_config_pb2.ModelConfig, model_file: Path, max_batch: int,
                 back: str = "thread") -> None:  # fmt: skip
        self.config = config
        max_batch = min(max_batch, config.max_batch_size or max_batch)
        if back == "process":
            self.batcher: EagerBatcher | ProcessBatcher = ProcessBatcher(
                model_file, config, max_batch)  # fmt: skip
            self.output_names = [t.name for t in config.output]
        else:
            session = open_session(model_file)
            self.batcher = EagerBatcher(session, max_batch)
            self.output_names = [t.name for t in session.get_outputs()]

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="minimal", version="0", extensions=[])

    async def ModelMetadata(self, request, context):
        def tensors(specs):
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name,
                    datatype=model_config_pb2.DataType.Name(t.data_type)[5:].replace(
                        "STRING", "BYTES"
                    ),
                    shape=[-1, *t.dims],
                )
                for t in specs
            ]

        return pb.ModelMetadataResponse(
            name=self.config.name, versions=["1"], platform="onnxruntime_onnx",
            inputs=tensors(self.config.input), outputs=tensors(self.config.output),
        )  # fmt: skip

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.config)

    async def ModelStatistics(self, request, context):
        stats = pb.ModelStatistics(name=self.config.name, version="1",
                                   inference_count=self.batcher.images,
                                   execution_count=self.batcher.batches)  # fmt: skip
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def ModelInfer(self, request, context):
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tensor.shape)
        ys = await self.batcher.submit(x)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=y.shape)
                for name, y in zip(self.output_names, ys, strict=True)
            ],
            raw_output_contents=[y.tobytes() for y in ys],
        )


async def serve(repository: Path, model: str, port: int, max_batch: int, back: str) -> None:
    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config.name = model
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])  # fmt: skip
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        Servicer(config, latest_model(repository, model), max_batch, back), server
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"minimal server on 127.0.0.1:{port} serving {model}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = reference_parser(__doc__.splitlines()[0])
    parser.add_argument("--max-batch", type=int, default=32,
                        help="largest executed batch (default: 32)")  # fmt: skip
    parser.add_argument("--back", choices=("thread", "process"), default="thread",
                        help="where ONNX Runtime runs: a one-thread executor, or a child "
                             "process fed through shared memory (default: thread)")  # fmt: skip
    args = parser.parse_args()
    uvloop.run(serve(args.repository, args.model, args.port, args.max_batch, args.back))


if __name__ == "__main__":
    main()
