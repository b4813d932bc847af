"""Finding the deployment tools (buildah, promtool, kustomize, the deploy venv) or skipping.

Under CI=true a missing tool fails the test instead: `make test` installs every one of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEPLOY_VENV = ROOT / ".venv-deploy"
DEPLOY_PYTHON = DEPLOY_VENV / "bin" / "python"


def missing(reason: str) -> NoReturn:
    """Skip for `reason`, or fail when running in CI, where `make test` should have installed it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: `make test` installs it)")
    pytest.skip(reason)


def binary(name: str, hint: str) -> str:
    """The path of an executable on PATH, or skip (fail in CI) saying how to get it."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed: {hint}")
    return found


def deploy_python() -> Path:
    """The python of the deploy-tools venv (kserve, kubernetes-validate, yamllint)."""
    if not DEPLOY_PYTHON.exists():
        missing(f"{DEPLOY_VENV} is missing: `make tools` creates it")
    return DEPLOY_PYTHON
