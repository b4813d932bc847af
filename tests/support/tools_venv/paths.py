"""Where the tools venv and its binaries live, and how to skip when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

from tests.deploy.tools import missing

ROOT = Path(__file__).resolve().parents[3]
TOOLS_VENV = ROOT / ".venv-tools"
TOOLS_PYTHON = TOOLS_VENV / "bin" / "python"
PERF_ANALYZER = TOOLS_VENV / "bin" / "perf_analyzer"
CUDA_RUNTIME_LIB = TOOLS_VENV / "lib/python3.11/site-packages/nvidia/cuda_runtime/lib"
SCRIPTS = Path(__file__).resolve().parent


def require_tools_python() -> Path:
    """The tools venv's python, or skip (fail in CI) saying how to get it."""
    if not TOOLS_PYTHON.exists():
        missing(f"{TOOLS_VENV} is missing: `make tools` installs tritonclient and friends")
    return TOOLS_PYTHON


def perf_analyzer_env() -> dict[str, str]:
    """Environment for perf_analyzer: it needs the CUDA runtime library even on a CPU host."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (str(CUDA_RUNTIME_LIB), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env
