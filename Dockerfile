# The serving image: ONNX Runtime, gRPC, numpy, Prometheus client, Pillow. No PyTorch.
#   make model && docker build -t cnnserve .
#   docker run -p 8001:8001 -p 8002:8002 cnnserve
# The model repository is baked in from ./model_repository; mount another over /models to swap.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# Where pip must trust a local CA bundle (a build behind a proxy), pass its path in PIP_CERT.
ARG PIP_CERT=""
ARG ORT_PACKAGE=onnxruntime
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
RUN pip install "grpcio-tools==1.85.*" && python proto/generate.py && pip uninstall -y grpcio-tools \
    && pip install . "${ORT_PACKAGE}" \
    && python -c "import service.server, onnxruntime; print(onnxruntime.get_available_providers())" \
    && ! python -c "import torch" 2>/dev/null

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home cnnserve
COPY --from=build /opt/venv /opt/venv
COPY model_repository/ /models/
# All interfaces inside the container (the server's own default is loopback); see README Security.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    CNNSERVE_MODEL_REPOSITORY=/models CNNSERVE_LOG_FORMAT=json CNNSERVE_HOST=0.0.0.0
USER 10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "service.probe", "--url", "127.0.0.1:8001"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "service"]
