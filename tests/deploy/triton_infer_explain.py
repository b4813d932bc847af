"""Infer and explain against a running server with tritonclient (run in .venv-tools).

Usage: triton_infer_explain.py ADDRESS MODEL OUTDIR. Saves inputs.npy, probabilities.npy and
cam.npy to OUTDIR and prints a JSON summary. The explanation is a plain ModelInfer on the
exported `<MODEL>_gradcam` model, so any Open Inference Protocol client can ask for one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient


def main(address: str, model: str, outdir: Path) -> dict[str, object]:
    client = grpcclient.InferenceServerClient(url=address)
    summary: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "explainer_ready": client.is_model_ready(f"{model}_gradcam"),
    }
    config = client.get_model_config(model, as_json=True)["config"]
    summary["provider"] = config.get("parameters", {}).get("execution_provider", {})

    images = np.random.default_rng(7).random((4, 1, 28, 28), dtype=np.float32)
    np.save(outdir / "inputs.npy", images)
    image_input = grpcclient.InferInput("input", list(images.shape), "FP32")
    image_input.set_data_from_numpy(images)
    result = client.infer(
        model, [image_input], outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    np.save(outdir / "probabilities.npy", result.as_numpy("probabilities"))

    targets = np.array([[-1], [0], [3], [9]], dtype=np.int64)
    target_input = grpcclient.InferInput("target_class", list(targets.shape), "INT64")
    target_input.set_data_from_numpy(targets)
    explained = client.infer(f"{model}_gradcam", [image_input, target_input])
    np.save(outdir / "cam.npy", explained.as_numpy("cam"))
    summary["explained_class"] = explained.as_numpy("explained_class").reshape(-1).tolist()
    client.close()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
