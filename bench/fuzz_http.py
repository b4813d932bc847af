"""Fuzz a live server's HTTP API (KServe v2 REST) with mutated requests; count 5xx and RSS.

    .venv/bin/python -m bench.fuzz_http --repository model_repository [--count 100000]

Starts `python -m service` on free ports, then sends `--count` requests built from valid seeds (JSON and binary infer,
classification, metadata, config, statistics, repository calls) and mutated: bytes flipped,
bodies cut or spliced, JSON values swapped for hostile ones (huge or negative dims, wrong types,
deep nesting), Inference-Header-Content-Length and binary_data_size lied about, odd paths and
methods. Prints counts by status, the server's RSS, threads and descriptors before and after;
exits 1 if any request got a 5xx, a connection failed, or the server is not serving afterwards.
Writes bench/results/fuzz_http.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bench.loadgen import free_port, process_status, server_process
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

Request = tuple[str, str, bytes, dict[str, str]]
# 503s that are the API working as meant: a client's tiny `timeout`, a full queue
DELIBERATE = re.compile(rb"deadline|timeout|queue", re.IGNORECASE)
samples: list[str] = []
HOSTILE_VALUES: list[Any] = [
    None, True, -1, 0, 1, 2**31, 2**63, 10**30, -(10**12), 1.5, float("inf"), "", "x" * 300,
    "FP64", [], [[]], {}, [10**12, 1, 28, 28], [1] * 100, {"a": [1, 2]},
]  # fmt: skip


def seeds(model: str, rng: random.Random) -> list[Request]:
    """Valid requests of every kind the API serves."""
    image = np.random.default_rng(rng.randrange(1 << 30)).random((1, 1, 28, 28), np.float32)
    infer = f"/v2/models/{model}/infer"
    json_infer = {
        "id": "fuzz",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 28, 28],
                "data": image.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    head = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                 "parameters": {"binary_data_size": image.nbytes}}
            ],
            "parameters": {"binary_data_output": True, "timeout": 5_000_000},
        }
    ).encode()  # fmt: skip
    binary = (
        "POST",
        infer,
        head + image.tobytes(),
        {"Inference-Header-Content-Length": str(len(head))},
    )
    picture = (ROOT / "data" / "samples" / "digit0_7.png").read_bytes()
    explain = f"/v2/models/{model}/explain"
    explain_json = {
        "image": base64.b64encode(picture).decode(),
        "method": "integrated_gradients",
        "ig_steps": 4,
        "annotated": True,
        "top_k": 3,
        "target_classes": [1, 7],
        "feature_maps": True,
        "parameters": {"timeout": 5_000_000},
    }
    return [
        ("POST", infer, json.dumps(json_infer).encode(), {}),
        binary,
        (
            "POST",
            f"{explain}?method=hirescam&annotated=true&top_k=2&heatmap_scale=per_class",
            picture,
            {"Content-Type": "image/png"},
        ),
        ("POST", explain, json.dumps(explain_json).encode(), {"Content-Type": "application/json"}),
        ("POST", f"{explain}?heatmap_scale=shared&top_k=3", picture, {"Accept": "image/png"}),
        ("GET", "/v2/health/live", b"", {}),
        ("GET", "/v2/health/ready", b"", {}),
        ("GET", "/v2", b"", {}),
        ("GET", f"/v2/models/{model}", b"", {}),
        ("GET", f"/v2/models/{model}/versions/1/ready", b"", {}),
        ("GET", f"/v2/models/{model}/config", b"", {}),
        ("GET", f"/v2/models/{model}/stats", b"", {}),
        ("GET", "/v2/models/stats", b"", {}),
        ("POST", "/v2/repository/index", b'{"ready": true}', {}),
        ("POST", f"/v2/repository/models/{model}/load", b"{}", {}),
        ("POST", f"/v2/repository/models/{model}/unload", b'{"parameters": {}}', {}),
    ]


def mutate_json(value: Any, rng: random.Random) -> Any:
    """Replace, drop or duplicate one node somewhere in a parsed JSON document."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.2:
            return {k: v for k, v in value.items() if k != key}
        if roll < 0.5:
            return {**value, key: rng.choice(HOSTILE_VALUES)}
        return {**value, key: mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        roll = rng.random()
        copy = list(value)
        if roll < 0.2:
            del copy[index]
        elif roll < 0.4:
            copy.append(copy[index])
        elif roll < 0.6:
            copy[index] = rng.choice(HOSTILE_VALUES)
        else:
            copy[index] = mutate_json(value[index], rng)
        return copy
    return rng.choice(HOSTILE_VALUES)


def mutate(request: Request, rng: random.Random) -> Request:
    """One mutation of a seed request: its body, header, path or method."""
    method, path, body, headers = request
    headers = dict(headers)
    roll = rng.random()
    if roll < 0.35 and body:
        length = int(headers.get("Inference-Header-Content-Length", len(body)))
        try:
            document = json.loads(body[:length])
        except ValueError:
            document = None
        if document is not None:
            text = json.dumps(mutate_json(document, rng)).encode()
            tail = body[length:]
            body = text + tail
            if "Inference-Header-Content-Length" in headers:
                headers["Inference-Header-Content-Length"] = str(len(text))
    elif roll < 0.55 and body:
        data = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        body = bytes(data)
    elif roll < 0.65 and body:
        body = (
            body[: rng.randrange(len(body))]
            if rng.random() < 0.5
            else body + body[: rng.randrange(len(body))]
        )
    elif roll < 0.75:
        headers["Inference-Header-Content-Length"] = str(
            rng.choice([-1, 0, 1, len(body) - 1, len(body) + 1, 2**40, 10**30])
        )
    elif roll < 0.82:
        depth = rng.choice([10, 1000, 100_000])
        body = b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"inputs":' + b"[" * depth
    elif roll < 0.86 and "?" in path:
        base, query = path.split("?", 1)
        pairs = [p.split("=", 1) for p in query.split("&")]
        pick = pairs[rng.randrange(len(pairs))]
        pick[-1] = quote(str(rng.choice(HOSTILE_VALUES))[:300], safe="")
        path = base + "?" + "&".join("=".join(p) for p in pairs)
    elif roll < 0.9:
        parts = path.split("/")
        index = rng.randrange(len(parts))
        parts[index] = rng.choice(["", "..", "%00", "x" * 500, "versions", "infer", "%2F", "stats"])
        path = "/".join(parts)
    elif roll < 0.95:
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"])
    else:
        headers[rng.choice(["Content-Encoding", "Content-Type", "Authorization"])] = rng.choice(
            ["gzip", "deflate", "application/json", "Bearer x", "\x7f"]
        )
    return method, path, body, headers


def worker(
    port: int, count: int, seed: int, model: str, results: Counter[str], lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    pool = seeds(model, rng)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    local: Counter[str] = Counter()
    for i in range(count):
        request = rng.choice(pool)
        if i % 10:  # one in ten goes as is: the server must keep answering those with 200
            request = mutate(request, rng)
        method, path, body, headers = request
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            status = str(response.status)
            if response.status >= 500 and DELIBERATE.search(answer):
                status += " (deliberate: deadline or queue)"
            local[status] += 1
            if response.status >= 500 and len(samples) < 20:
                samples.append(f"{response.status} {method} {path[:80]}: {answer[:200]!r}")
            if response.getheader("connection", "").lower() == "close":
                connection.close()
        except (http.client.HTTPException, OSError) as exc:
            local[f"client-error:{type(exc).__name__}"] += 1
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.close()
    with lock:
        results.update(local)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="model to target")
    parser.add_argument("--count", type=int, default=100_000, help="requests in all")
    parser.add_argument(
        "--threads", type=int, default=4, help="client threads (one connection each)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/fuzz_http.json", help="JSON results"
    )
    args = parser.parse_args(argv)
    repository = args.repository
    port = free_port()
    extra = ("--http-port", str(port), "--max-message-bytes", str(4 * 1024 * 1024))
    with server_process(repository, *extra) as (_, process, _metrics):
        before = process_status(process.pid)
        results: Counter[str] = Counter()
        lock = threading.Lock()
        share = args.count // args.threads
        started = time.perf_counter()
        threads = [
            threading.Thread(
                target=worker, args=(port, share, args.seed + i, args.model, results, lock)
            )
            for i in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        after = process_status(process.pid)
        check = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        check.request("GET", "/v2/health/ready")
        alive = check.getresponse().status == 200 and process.poll() is None
    failures = sum(
        n
        for status, n in results.items()
        if status.startswith(("5", "client-error")) and "deliberate" not in status
    )
    for sample in samples:
        print("  " + sample)
    print(
        f"{sum(results.values())} requests in {elapsed:.0f} s: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(results.items()))
    )
    for key in ("rss", "peak_rss", "threads", "fds"):
        scale = 1 / 2**20 if "rss" in key else 1
        unit = " MiB" if "rss" in key else ""
        print(
            f"  {key:9s} before {before[key] * scale:8.1f}{unit}  after {after[key] * scale:8.1f}{unit}"
        )
    print(f"server alive and ready afterwards: {alive}; 5xx or failed connections: {failures}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"count": sum(results.values()), "seconds": elapsed, "statuses": results,
                    "before": before, "after": after, "alive": alive, "failures": failures,
                    "samples": samples}, indent=1)
    )  # fmt: skip
    return 0 if alive and failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
