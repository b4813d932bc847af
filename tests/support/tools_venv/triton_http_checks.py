"""Exercise a running server's HTTP API with tritonclient.http (run in .venv-tools).

Usage: triton_http_checks.py URL MODEL OUTDIR. Writes inputs.npy and the outputs it got (binary
and JSON) as .npy files to OUTDIR and prints a JSON summary of every call.
`triton_http_checks.py URL MODEL --control` unloads and loads MODEL (explicit model control).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, outdir: Path) -> dict[str, object]:
    client = httpclient.InferenceServerClient(url=url)
    summary: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "version_ready": client.is_model_ready(model, "1"),
        "unknown_ready": client.is_model_ready("no_such_model"),
        "server": client.get_server_metadata(),
        "metadata": client.get_model_metadata(model),
        "metadata_v1": client.get_model_metadata(model, "1")["name"],
    }
    config = client.get_model_config(model)
    summary["max_batch_size"] = config.get("max_batch_size", 0)
    summary["provider"] = config.get("parameters", {}).get("execution_provider", {})

    images = np.random.default_rng(3).random((4, 1, 28, 28), dtype=np.float32)
    np.save(outdir / "inputs.npy", images)
    for binary in (True, False):
        tag = "binary" if binary else "json"
        infer_input = httpclient.InferInput("input", list(images.shape), "FP32")
        infer_input.set_data_from_numpy(images, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(o["name"], binary_data=binary)
            for o in summary["metadata"]["outputs"]  # type: ignore[index]
        ]
        result = client.infer(model, [infer_input], outputs=outputs, request_id=f"parity-{tag}")
        for o in summary["metadata"]["outputs"]:  # type: ignore[index]
            np.save(outdir / f"{tag}_{o['name']}.npy", result.as_numpy(o["name"]))
        summary[f"{tag}_id"] = result.get_response()["id"]
    default = client.infer(model, [infer_input])  # no outputs named: all, in binary
    summary["default_outputs"] = sorted(o["name"] for o in default.get_response()["outputs"])

    for binary in (True, False):
        top = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        classes = client.infer(model, [infer_input], outputs=[top]).as_numpy("probabilities")
        summary[f"top3_{'binary' if binary else 'json'}"] = [
            [item.decode() if isinstance(item, bytes) else str(item) for item in row]
            for row in classes
        ]
    summary["timeout_ok"] = client.infer(model, [infer_input], timeout=10_000_000).as_numpy(
        "probabilities"
    ).shape == (4, 10)

    errors = {}
    bad = httpclient.InferInput("input", [1, 1, 28, 28], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float64))
    for name, call in {
        "bad_datatype": lambda: client.infer(model, [bad]),
        "unknown_model": lambda: client.get_model_metadata("no_such_model"),
        "unknown_version": lambda: client.get_model_config(model, "7"),
        "load_disabled": lambda: client.load_model(model),
    }.items():
        try:
            call()
            errors[name] = "accepted"
        except InferenceServerException as exc:
            errors[name] = [exc.status(), exc.message()]
    summary["errors"] = errors

    stats = client.get_inference_statistics(model)["model_stats"][0]
    summary["statistics"] = {
        "inference_count": stats["inference_count"],
        "execution_count": stats["execution_count"],
        "success": stats["inference_stats"]["success"]["count"],
        "fail": stats["inference_stats"]["fail"]["count"],
        "batch_sizes": [b["batch_size"] for b in stats["batch_stats"]],
    }
    summary["all_statistics"] = len(client.get_inference_statistics()["model_stats"])
    index = client.get_model_repository_index()
    summary["index"] = {m["name"]: m.get("state", "") for m in index}
    client.close()
    return summary


def control(url: str, model: str) -> dict[str, object]:
    """Unload, then load, then look: the repository calls under --model-control-mode explicit."""
    client = httpclient.InferenceServerClient(url=url)
    summary: dict[str, object] = {"ready_before": client.is_model_ready(model)}
    client.unload_model(model)
    summary["ready_unloaded"] = client.is_model_ready(model)
    summary["index_unloaded"] = {
        m["name"]: [m.get("state", ""), m.get("reason", "")]
        for m in client.get_model_repository_index()
    }
    client.load_model(model)
    summary["ready_loaded"] = client.is_model_ready(model)
    try:
        client.load_model("no_such_model")
        summary["load_unknown"] = "accepted"
    except InferenceServerException as exc:
        summary["load_unknown"] = [exc.status(), exc.message()]
    client.close()
    return summary


if __name__ == "__main__":
    if sys.argv[3] == "--control":
        print(json.dumps(control(sys.argv[1], sys.argv[2])))
    else:
        print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
