"""Call every public method of tritonclient.grpc.InferenceServerClient (run in .venv-tools).

Usage: triton_walk.py ADDRESS MODEL OUTDIR. Prints JSON: {"methods": [every public method name],
"rows": [{"method", "result" ("OK" or the status name), "detail"}], ...checks}. Shared memory is
real: POSIX regions made with tritonclient.utils.shared_memory, inputs read from one and outputs
written into another, compared with the same request sent in the message.
"""

from __future__ import annotations

import base64
import inspect
import json
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc.auth import BasicAuth
from tritonclient.utils import InferenceServerException

ROWS: list[dict[str, Any]] = []


def row(method: str, fn: Callable[[], Any]) -> Any:
    """Run one call; record OK with a short detail, or the status it got."""
    try:
        value = fn()
    except InferenceServerException as exc:
        status = (exc.status() or "").removeprefix("StatusCode.")
        ROWS.append({"method": method, "result": status, "detail": exc.message()})
        return None
    detail = value if isinstance(value, str | int | float | bool) else ""
    ROWS.append({"method": method, "result": "OK", "detail": detail})
    return value


def _input(images: np.ndarray) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput("input", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images)
    return infer_input


def main(address: str, model: str, outdir: Path) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url=address)
    report: dict[str, Any] = {
        "methods": sorted(
            n
            for n, _ in inspect.getmembers(grpcclient.InferenceServerClient, inspect.isfunction)
            if not n.startswith("_")
        )
    }
    images = np.random.default_rng(7).random((4, 1, 28, 28), dtype=np.float32)

    row("is_server_live", client.is_server_live)
    row("is_server_ready", client.is_server_ready)
    row("is_model_ready", lambda: client.is_model_ready(model))
    server = row("get_server_metadata", lambda: client.get_server_metadata(as_json=True))
    report["extensions"] = server["extensions"] if server else []
    row("get_model_metadata", lambda: client.get_model_metadata(model, as_json=True)["name"])
    row(
        "get_model_config",
        lambda: client.get_model_config(model, as_json=True)["config"]["max_batch_size"],
    )
    row(
        "get_model_repository_index",
        lambda: len(client.get_model_repository_index(as_json=True)["models"]),
    )
    row("load_model", lambda: client.load_model(model))
    row("unload_model", lambda: client.unload_model(f"{model}_gradcam"))
    reference = client.infer(model, [_input(images)]).as_numpy("logits")
    row("infer", lambda: client.infer(model, [_input(images)]).as_numpy("logits").shape[0])

    done: queue.Queue[Any] = queue.Queue()
    row(
        "async_infer",
        lambda: client.async_infer(
            model, [_input(images)], lambda result, error: done.put((result, error))
        ),
    )
    result, error = done.get(timeout=30)
    report["async_ok"] = error is None and np.allclose(result.as_numpy("logits"), reference)

    streamed: queue.Queue[Any] = queue.Queue()
    row(
        "start_stream",
        lambda: client.start_stream(lambda result, error: streamed.put((result, error))),
    )
    row("async_stream_infer", lambda: client.async_stream_infer(model, [_input(images)]))
    result, error = streamed.get(timeout=30)
    report["stream_ok"] = error is None and np.allclose(result.as_numpy("logits"), reference)
    row("stop_stream", client.stop_stream)

    # system shared memory: input region and output region, as perf_analyzer uses them
    in_bytes, out_bytes = images.nbytes, reference.nbytes
    keys = (f"/cnnserve_walk_in_{time.time_ns()}", f"/cnnserve_walk_out_{time.time_ns()}")
    in_handle = shm.create_shared_memory_region("walk_in", keys[0], in_bytes)
    out_handle = shm.create_shared_memory_region("walk_out", keys[1], out_bytes)
    try:
        shm.set_shared_memory_region(in_handle, [images])
        row(
            "register_system_shared_memory",
            lambda: client.register_system_shared_memory("walk_in", keys[0], in_bytes),
        )
        client.register_system_shared_memory("walk_out", keys[1], out_bytes)
        status = row(
            "get_system_shared_memory_status",
            lambda: client.get_system_shared_memory_status(as_json=True),
        )
        report["shm_status"] = status
        infer_input = grpcclient.InferInput("input", list(images.shape), "FP32")
        infer_input.set_shared_memory("walk_in", in_bytes)
        wanted = grpcclient.InferRequestedOutput("logits")
        wanted.set_shared_memory("walk_out", out_bytes)
        client.infer(model, [infer_input], outputs=[wanted])
        from_region = shm.get_contents_as_numpy(out_handle, np.float32, list(reference.shape))
        report["shm_matches"] = bool(np.allclose(from_region, reference, atol=1e-5))
        wanted.set_shared_memory("walk_out", out_bytes - 4)  # too small: refused, named
        try:
            client.infer(model, [infer_input], outputs=[wanted])
            report["shm_small_output"] = "accepted"
        except InferenceServerException as exc:
            report["shm_small_output"] = f"{exc.status()}: {exc.message()}"
        row(
            "unregister_system_shared_memory",
            lambda: client.unregister_system_shared_memory("walk_in"),
        )
        client.unregister_system_shared_memory()
        report["shm_after"] = client.get_system_shared_memory_status(as_json=True)
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)

    # CUDA shared memory: refused with the reason on this CPU server
    row("get_cuda_shared_memory_status", client.get_cuda_shared_memory_status)
    handle = base64.b64encode(bytes(64))
    row(
        "register_cuda_shared_memory", lambda: client.register_cuda_shared_memory("g", handle, 0, 8)
    )
    row("unregister_cuda_shared_memory", client.unregister_cuda_shared_memory)

    # traces: Triton's JSON file, written when the settings change
    trace_file = outdir / "trace.json"
    row(
        "update_trace_settings",
        lambda: client.update_trace_settings(
            settings={
                "trace_file": str(trace_file),
                "trace_level": ["TIMESTAMPS"],
                "trace_rate": "1",
                "trace_count": "-1",
                "log_frequency": "0",
            },
            as_json=True,
        )["settings"]["trace_level"]["value"][0],
    )
    for request_id in ("t1", "t2"):
        client.infer(model, [_input(images)], request_id=request_id)
    report["model_trace"] = client.update_trace_settings(
        model_name=model, settings={"trace_rate": "2"}, as_json=True
    )["settings"]
    report["trace_settings"] = row(
        "get_trace_settings", lambda: client.get_trace_settings(as_json=True)["settings"]
    )
    client.update_trace_settings(settings={"trace_level": ["OFF"]})
    report["trace_file"] = json.loads(trace_file.read_text()) if trace_file.exists() else None

    # logs
    report["log_settings"] = row("get_log_settings", lambda: client.get_log_settings(as_json=True))
    before = report["log_settings"]["settings"]
    report["log_updated"] = row(
        "update_log_settings",
        lambda: client.update_log_settings(
            {"log_info": True, "log_verbose_level": 1, "log_format": "json"}, as_json=True
        ),
    )
    report["log_after"] = client.get_log_settings(as_json=True)["settings"]
    client.update_log_settings(
        {
            "log_info": before["log_info"]["bool_param"],
            "log_verbose_level": 0,
            "log_format": before["log_format"]["string_param"],
        }
    )
    report["log_restored"] = client.get_log_settings(as_json=True)["settings"]

    # statistics last: every request above counted
    row(
        "get_inference_statistics",
        lambda: int(
            client.get_inference_statistics(model, as_json=True)["model_stats"][0][
                "inference_count"
            ]
        ),
    )
    # client-side plugins: headers added to every call
    row("register_plugin", lambda: client.register_plugin(BasicAuth("user", "secret")))
    row("plugin", lambda: type(client.plugin()).__name__)
    row("unregister_plugin", client.unregister_plugin)
    row("close", client.close)
    report["rows"] = ROWS
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])), default=str))
