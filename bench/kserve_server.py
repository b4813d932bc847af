"""KServe's Python model server running the same ONNX file, as a reference point for compare.py.

    .venv-kserve/bin/python bench/kserve_server.py --repository model_repository --port 8001

KServe 0.21 (`make kserve` makes .venv-kserve): a `kserve.Model` whose `predict` runs ONNX Runtime
(one intra-op thread) on each request as it comes, on the event loop, as KServe's own Python
predictors do; no batching (KServe's Python server has none). Its gRPC front speaks the same
Open Inference Protocol (`inference.GRPCInferenceService`), so h2load's pre-built frames work
unchanged; it has no ModelStatistics (compare.py shows no executed batch for it). Request and
latency logs are off. Runs in its own venv: KServe pins a protobuf our generated code does not
take.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference_cli import free_port, latest_model, reference_parser


def serve(repository: Path, model: str, port: int) -> None:
    """Start KServe's ModelServer with the ONNX model (blocks until the server stops)."""
    sys.argv = sys.argv[:1]  # KServe parses the command line when imported: ours is not its
    import kserve
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse

    class OnnxModel(kserve.Model):  # type: ignore[misc]
        """One ONNX model, run whole for each request."""

        def __init__(self, name: str, model_file: Path) -> None:
            super().__init__(name)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(model_file), options, providers=["CPUExecutionProvider"]
            )
            self.input_name = self.session.get_inputs()[0].name
            self.output_names = [t.name for t in self.session.get_outputs()]
            self.ready = True

        async def predict(
            self,
            payload: InferRequest,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            ys = self.session.run(self.output_names, {self.input_name: x})
            outputs = []
            for name, y in zip(self.output_names, ys, strict=True):
                output = InferOutput(name=name, shape=list(y.shape), datatype="FP32")
                output.set_data_from_numpy(y, binary_data=True)  # raw_output_contents
                outputs.append(output)
            return InferResponse(
                model_name=self.name, infer_outputs=outputs, response_id=payload.id
            )

    model_file = latest_model(repository, model)
    server = kserve.ModelServer(
        grpc_port=port,
        http_port=free_port(),
        enable_grpc=True,
        enable_latency_logging=False,
        enable_docs_url=False,
    )
    logging.getLogger("kserve").setLevel(logging.WARNING)  # it logs every gRPC call at INFO
    print(f"KServe on 127.0.0.1:{port} serving {model}", flush=True)
    server.start([OnnxModel(model, model_file)])


def main() -> None:
    args = reference_parser(__doc__.splitlines()[0]).parse_args()
    serve(args.repository, args.model, args.port)


if __name__ == "__main__":
    main()
