"""Triton Python-backend model: all requests of a batch concatenated, ONNX Runtime run once.

Copied into a generated Triton repository by bench/triton_server.py; runs inside Triton's
Python-backend stub (its numpy and onnxruntime come from .venv-triton).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output_names = [t["name"] for t in config["output"]]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        onnx_file = Path(__file__).parent / "model.onnx"
        self.session = ort.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.input_tensor = config["input"][0]["name"]

    def execute(self, requests):
        parts = [
            pb_utils.get_input_tensor_by_name(r, self.input_tensor).as_numpy() for r in requests
        ]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ys = self.session.run(self.output_names, {self.input_name: x})
        responses, start = [], 0
        for part in parts:
            end = start + len(part)
            outs = [
                pb_utils.Tensor(n, y[start:end]) for n, y in zip(self.output_names, ys, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outs))
            start = end
        return responses
