"""Exercise a running server with tritonclient (run in .venv-tools, not in pytest's process).

Usage: triton_checks.py ADDRESS MODEL OUTDIR. Writes inputs.npy and the outputs it got as .npy
files to OUTDIR (pytest compares them with ONNX Runtime run directly) and prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(address: str, model: str, outdir: Path) -> dict[str, object]:
    client = grpcclient.InferenceServerClient(url=address)
    summary: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    server = client.get_server_metadata(as_json=True)
    summary["server"] = {"name": server["name"], "extensions": server.get("extensions", [])}
    metadata = client.get_model_metadata(model, as_json=True)
    summary["metadata"] = metadata
    config = client.get_model_config(model, as_json=True)["config"]
    summary["max_batch_size"] = config.get("max_batch_size", 0)
    summary["provider"] = config.get("parameters", {}).get("execution_provider", {})

    rng = np.random.default_rng(3)
    images = rng.random((4, 1, 28, 28), dtype=np.float32)
    np.save(outdir / "inputs.npy", images)
    infer_input = grpcclient.InferInput("input", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput(o["name"]) for o in metadata["outputs"]]
    result = client.infer(model, [infer_input], outputs=outputs, request_id="parity")
    for o in metadata["outputs"]:
        np.save(outdir / f"{o['name']}.npy", result.as_numpy(o["name"]))
    summary["response_id"] = result.get_response().id

    top = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    classes = client.infer(model, [infer_input], outputs=[top]).as_numpy("probabilities")
    summary["top3"] = [[item.decode() for item in row] for row in classes]

    try:
        bad = grpcclient.InferInput("input", [1, 1, 28, 28], "FP64")
        bad.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float64))
        client.infer(model, [bad])
        summary["bad_datatype"] = "accepted"
    except InferenceServerException as exc:
        summary["bad_datatype"] = exc.status()

    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    summary["statistics"] = {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "success": int(stats["inference_stats"]["success"].get("count", 0)),
        "fail": int(stats["inference_stats"].get("fail", {}).get("count", 0)),
        "batch_sizes": [int(b["batch_size"]) for b in stats.get("batch_stats", [])],
    }
    index = client.get_model_repository_index(as_json=True)
    summary["index"] = {m["name"]: m.get("state", "") for m in index.get("models", [])}
    client.close()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
