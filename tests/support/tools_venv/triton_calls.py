"""Make a list of calls with tritonclient and report how each ended (run in .venv-tools).

Usage: triton_calls.py PLAN.json. The plan is {"address": ..., "calls": [call, ...]}, each call
{"name", "call", "model"?, "token"?, "tls"?: {"ca", "cert"?, "key"?}}, `call` being one of live,
ready, metadata, infer, stream, statistics, index, load, unload. Prints {name: {"status",
"message", "value"}} as JSON, status "OK" or the gRPC status name (UNAUTHENTICATED, ...).
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _client(address: str, tls: dict[str, str] | None) -> grpcclient.InferenceServerClient:
    if not tls:
        return grpcclient.InferenceServerClient(url=address)
    return grpcclient.InferenceServerClient(
        url=address,
        ssl=True,
        root_certificates=tls["ca"],
        private_key=tls.get("key"),
        certificate_chain=tls.get("cert"),
    )


def _inputs() -> list[grpcclient.InferInput]:
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    infer_input = grpcclient.InferInput("input", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images)
    return [infer_input]


def _stream(client: grpcclient.InferenceServerClient, model: str, headers: dict[str, str]) -> Any:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers=headers
    )
    try:
        # if the stream failed before the send, its callback has the reason
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer(model, _inputs(), request_id="s1")
        result, error = results.get(timeout=30)
    finally:
        client.stop_stream()
    if error is not None:
        raise error
    return result.as_numpy("logits").shape[0]


def call(address: str, spec: dict[str, Any]) -> Any:
    client = _client(address, spec.get("tls"))
    token = spec.get("token")
    headers = {"authorization": f"Bearer {token}"} if token else None
    model = spec.get("model", "")
    kind = spec["call"]
    try:
        if kind == "live":
            return client.is_server_live(headers=headers)
        if kind == "ready":
            return client.is_model_ready(model, headers=headers)
        if kind == "metadata":
            return client.get_model_metadata(model, headers=headers, as_json=True)["name"]
        if kind == "infer":
            result = client.infer(model, _inputs(), headers=headers)
            return result.as_numpy("logits").shape[0]
        if kind == "stream":
            return _stream(client, model, headers or {})
        if kind == "statistics":
            stats = client.get_inference_statistics(model, headers=headers, as_json=True)
            return len(stats.get("model_stats", []))
        if kind == "index":
            index = client.get_model_repository_index(headers=headers, as_json=True)
            return {m["name"]: m.get("state", "") for m in index.get("models", [])}
        if kind == "load":
            client.load_model(model, headers=headers)
            return None
        if kind == "unload":
            client.unload_model(model, headers=headers)
            return None
        raise ValueError(f"unknown call {kind}")
    finally:
        client.close()


def main(plan_path: Path) -> dict[str, dict[str, Any]]:
    plan = json.loads(plan_path.read_text())
    report: dict[str, dict[str, Any]] = {}
    for spec in plan["calls"]:
        try:
            value = call(plan["address"], spec)
            report[spec["name"]] = {"status": "OK", "message": "", "value": value}
        except InferenceServerException as exc:
            status = (exc.status() or "").removeprefix("StatusCode.")
            report[spec["name"]] = {"status": status, "message": exc.message(), "value": None}
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
