"""The smallest server of the project's design, as a reference point for its per-request cost.

    .venv/bin/python bench/minimal_server.py --repository model_repository --port 8001

grpc.aio on uvloop; a batcher that never waits (whatever is queued runs as soon as ONNX Runtime
is free), up to 32 images; one ONNX Runtime session with one intra-op thread, run in a one-thread executor;
np.frombuffer in, raw_output_contents out. It answers just enough of the Open Inference Protocol
for h2load and perf_analyzer (ModelInfer, readiness, metadata, config; ModelStatistics
counts only images and batches) for one FP32 model.
No validation, statistics, metrics or deadlines: that is the point of it.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
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


class EagerBatcher:
    """Queue requests; while the session is busy they pile up and run together next time."""

    def __init__(self, session: ort.InferenceSession, max_batch: int) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.queue: list[tuple[np.ndarray, asyncio.Future]] = []
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
                start = 0
                for part, future in batch:
                    end = start + len(part)
                    if not future.done():
                        future.set_result([out[start:end] for out in y])
                    start = end
        finally:
            self.running = False


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, config: model_config_pb2.ModelConfig, model_file: Path, max_batch: int
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.batcher = EagerBatcher(session, min(max_batch, config.max_batch_size or max_batch))
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


async def serve(repository: Path, model: str, port: int, max_batch: int) -> None:
    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config.name = model
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])  # fmt: skip
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        Servicer(config, latest_model(repository, model), max_batch), server
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"minimal server on 127.0.0.1:{port} serving {model}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = reference_parser(__doc__.splitlines()[0])
    parser.add_argument("--max-batch", type=int, default=32,
                        help="largest executed batch (default: 32)")  # fmt: skip
    args = parser.parse_args()
    uvloop.run(serve(args.repository, args.model, args.port, args.max_batch))


if __name__ == "__main__":
    main()
