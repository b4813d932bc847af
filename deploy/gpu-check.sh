#!/usr/bin/env bash
# On a GPU host: is the GPU image really using CUDA? Run from the repository root after
#   make model && make image GPU=1          (the image cnnserve:gpu)
#   deploy/gpu-check.sh [IMAGE]             (default cnnserve:gpu; MODEL=mnist_cnn)
# Checks, in order: the provider ONNX Runtime really gives a session in the image is CUDA
# (session.get_providers(), not the compiled-in list); CUDA and CPU outputs agree within 1e-4;
# the server in the image answers a short perf_analyzer run; /metrics carries the GPU gauges and
# execution_provider_info says CUDAExecutionProvider. Needs docker (or podman) with the NVIDIA
# container toolkit, and `make tools` for perf_analyzer. Exits non-zero at the first failure.
set -euo pipefail

IMAGE=${1:-cnnserve:gpu}
MODEL=${MODEL:-mnist_cnn}
RUNTIME=${RUNTIME:-$(command -v docker || command -v podman)}
GPUS=${GPUS:---gpus all}
TOOLS=${TOOLS_VENV:-.venv-tools}
name=cnnserve-gpu-check-$$
step() { printf '\n== %s\n' "$*"; }
cleanup() { "$RUNTIME" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step "provider and parity inside $IMAGE"
# shellcheck disable=SC2086
"$RUNTIME" run --rm $GPUS --entrypoint python3 "$IMAGE" - "$MODEL" <<'PY'
import sys
import numpy as np
import onnxruntime as ort

model = sys.argv[1]
path = f"/models/{model}/1/model.onnx"
cuda = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
print("onnxruntime", ort.__version__, "device", ort.get_device())
print("session providers:", cuda.get_providers())
assert cuda.get_providers()[0] == "CUDAExecutionProvider", "CUDA is not really in use"
x = np.random.default_rng(0).random((64, *[d for d in cuda.get_inputs()[0].shape[1:]]), dtype=np.float32)
name = cuda.get_inputs()[0].name
for out_cuda, out_cpu, meta in zip(cuda.run(None, {name: x}), cpu.run(None, {name: x}), cuda.get_outputs()):
    diff = float(np.abs(out_cuda - out_cpu).max())
    print(f"{meta.name}: max |cuda - cpu| = {diff:.2e}")
    assert diff <= 1e-4, f"{meta.name} differs by {diff}"
PY

step "server in $IMAGE"
# shellcheck disable=SC2086
"$RUNTIME" run -d --name "$name" $GPUS -p 127.0.0.1:18001:8001 -p 127.0.0.1:18002:8002 \
    -e CNNSERVE_DEVICE=cuda "$IMAGE" >/dev/null
for _ in $(seq 60); do
    "$RUNTIME" exec "$name" python3 -m service.probe --url 127.0.0.1:8001 >/dev/null 2>&1 && break
    sleep 2
done
"$RUNTIME" exec "$name" python3 -m service.probe --url 127.0.0.1:8001

step "perf_analyzer (short)"
LD_LIBRARY_PATH=$TOOLS/lib/python3.11/site-packages/nvidia/cuda_runtime/lib \
    "$TOOLS/bin/perf_analyzer" -m "$MODEL" -i grpc -u 127.0.0.1:18001 -b 8 \
    --concurrency-range 1:8:7 --measurement-interval 2000 --stability-percentage 20 --max-trials 10

step "GPU metrics"
metrics=$(curl -fsS http://127.0.0.1:18002/metrics)
echo "$metrics" | grep -E '^cnnserve_(gpu_|execution_provider_info)'
echo "$metrics" | grep -q '^cnnserve_gpu_utilization_ratio' || { echo "no GPU gauges" >&2; exit 1; }
echo "$metrics" | grep -q "provider=\"CUDAExecutionProvider\"" || { echo "not on CUDA" >&2; exit 1; }
echo "$metrics" | grep -q "provider=\"CPUExecutionProvider\"" && { echo "a model fell back to the CPU" >&2; exit 1; }
step "GPU check passed"
