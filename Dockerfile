# The serving image: ONNX Runtime, gRPC, numpy, Prometheus client, Pillow. No PyTorch.
#   make model image                      (docker, or buildah where no engine runs)
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 cnnserve:latest   (HTTP, gRPC, metrics)
# The model repository is baked in from ./model_repository; mount another over /models to swap.
#
# VARIANT=gpu installs onnxruntime-gpu with the CUDA 13 and cuDNN 9 runtime libraries from their
# pip wheels (no CUDA base image needed; the host's driver brings libcuda) and registers their
# folders with the dynamic loader; the build fails if any library the CUDA provider needs does
# not resolve. `make image GPU=1` builds it as cnnserve:gpu; deploy/gpu-check.sh checks it on a
# GPU host.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# Where pip must trust a local CA bundle (a build behind a proxy), pass its path in PIP_CERT.
ARG PIP_CERT=""
ARG VARIANT=cpu
# The GPU build's ONNX Runtime (CUDA 13, cuDNN 9); its extras pull the matching NVIDIA wheels.
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_CERT=${PIP_CERT} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY service/ service/
COPY modelrepo/ modelrepo/
COPY deploy/check-cuda-libs.sh /usr/local/bin/check-cuda-libs
# grpcio-tools only generates pb/, then leaves; pip and setuptools leave the final venv too.
# The project itself installs from pyproject.toml, whose ranges are the pins (DL3013).
# hadolint ignore=DL3013
RUN pip install "grpcio-tools==1.85.*" && python proto/generate.py && pip uninstall -y grpcio-tools \
    && case "${VARIANT}" in \
         cpu) pip install ".[cpu]" ;; \
         gpu) pip install ".[gpu]" "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}" ;; \
         *) echo "VARIANT must be cpu or gpu" >&2; exit 1 ;; \
       esac \
    && python -c "import service.app, onnxruntime; print(onnxruntime.get_available_providers())" \
    && ! python -c "import torch" 2>/dev/null \
    && if [ "${VARIANT}" = gpu ]; then check-cuda-libs /opt/venv > /etc/ld.so.conf.d/cuda-wheels.conf; \
       else : > /etc/ld.so.conf.d/cuda-wheels.conf; fi \
    && find /opt/venv -depth -type d \( -name tests -path '*/numpy/*' \) -exec rm -rf {} + \
    && pip uninstall -y pip setuptools

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/*.log \
    && groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cnnserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /etc/ld.so.conf.d/cuda-wheels.conf /etc/ld.so.conf.d/cuda-wheels.conf
RUN ldconfig
COPY model_repository/ /models/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    CNNSERVE_MODEL_REPOSITORY=/models CNNSERVE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000 8001 8002
# Shell form, so the probe follows CNNSERVE_GRPC_PORT when the port is moved.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "exec python3 -m service.probe --url 127.0.0.1:${CNNSERVE_GRPC_PORT:-8001}"]
STOPSIGNAL SIGTERM
# Listen on every interface inside the container: the server's own default is loopback.
# --host covers gRPC and HTTP alike (--http-host and --metrics-host default to it).
ENTRYPOINT ["python3", "-m", "service", "--host", "0.0.0.0"]
