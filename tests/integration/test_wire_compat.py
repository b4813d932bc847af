"""Our compiled protos must be wire-compatible with tritonclient's: same names, numbers, types.

tritonclient's descriptors are dumped as JSON by a subprocess in .venv-tools (the two generated
`inference` packages cannot share a process) and compared here with ours.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from pb import grpc_service_pb2, model_config_pb2
from tests.support.tools_venv.descriptors import describe_file
from tests.support.tools_venv.paths import SCRIPTS, require_tools_python

SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def theirs() -> dict[str, Any]:
    python = require_tools_python()
    done = subprocess.run(
        [str(python), str(SCRIPTS / "descriptors.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return {
        "model_config": describe_file(model_config_pb2.DESCRIPTOR),
        "grpc_service": describe_file(grpc_service_pb2.DESCRIPTOR),
    }


def test_model_config_is_identical(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    # every message, field, number and type: any config.pbtxt written for Triton parses here
    mine, triton = ours["model_config"], theirs["model_config"]
    assert sorted(mine["messages"]) == sorted(triton["messages"])
    for name, fields in triton["messages"].items():
        assert mine["messages"][name] == fields, name
    assert mine["enums"] == triton["enums"]


def test_service_messages_match_field_by_field(
    ours: dict[str, Any], theirs: dict[str, Any]
) -> None:
    mine, triton = ours["grpc_service"], theirs["grpc_service"]
    assert len(mine["messages"]) >= 40
    for name, fields in mine["messages"].items():
        assert name in triton["messages"], f"{name} is not a Triton message"
        assert fields == triton["messages"][name], name


def test_service_methods_match(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    methods = ours["grpc_service"]["services"][SERVICE]
    assert len(methods) == 20
    for method, signature in methods.items():
        assert signature == theirs["grpc_service"]["services"][SERVICE][method], method
