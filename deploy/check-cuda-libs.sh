#!/bin/sh
# Build-time check for the GPU image: every shared library that ONNX Runtime's CUDA provider and
# the CUDA/cuDNN wheels link against must resolve, except the driver's own (libcuda, NVML), which
# the GPU host mounts in at run time. Prints the wheels' library folders, one a line, for
# /etc/ld.so.conf.d. Usage: check-cuda-libs VENV
set -eu
venv=${1:?usage: check-cuda-libs VENV}
site=$(echo "$venv"/lib/python3*/site-packages)
provider="$site/onnxruntime/capi/libonnxruntime_providers_cuda.so"
[ -f "$provider" ] || { echo "no CUDA provider in $site/onnxruntime (is onnxruntime-gpu installed?)" >&2; exit 1; }
dirs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u)
[ -n "$dirs" ] || { echo "no CUDA libraries under $site/nvidia" >&2; exit 1; }
path=$(echo "$dirs" | paste -sd:)
missing=$(for lib in "$provider" $(find "$site/nvidia" -name 'lib*.so*' -type f); do
        LD_LIBRARY_PATH="$path" ldd "$lib" | awk -v lib="$lib" '/not found/ {print lib ": " $1}'
    done | grep -Ev ': (libcuda\.so|libnvidia-ml\.so)' || true)
if [ -n "$missing" ]; then
    echo "unresolved libraries:" >&2
    echo "$missing" >&2
    exit 1
fi
for want in libcudart.so libcublas.so libcublasLt.so libcudnn.so libcufft.so libcurand.so; do
    find "$site/nvidia" -name "$want*" | grep -q . || { echo "$want is missing" >&2; exit 1; }
done
echo "CUDA provider libraries resolve ($(echo "$dirs" | wc -l) folders)" >&2
echo "$dirs"
