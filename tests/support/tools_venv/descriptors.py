"""Describe protobuf messages, enums and services as plain JSON-able data.

Runs in both venvs: pytest imports it for our `pb` package, and the wire test runs it as a script
in .venv-tools for tritonclient's generated modules (the two must never share a process).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _repeated(field: Any) -> bool:
    # protobuf >= 6 has `is_repeated` (and 7 dropped `label`); tritonclient's 4.x has `label`
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def describe_file(file: Any) -> dict[str, Any]:
    """Messages (with nested ones), enums and services of one FileDescriptor."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}

    def enum(e: Any) -> None:
        enums[e.full_name] = {v.name: v.number for v in e.values}

    def message(m: Any) -> None:
        messages[m.full_name] = {
            f.name: {
                "number": f.number,
                "type": f.type,
                "repeated": _repeated(f),
                "type_name": (f.message_type or f.enum_type).full_name
                if (f.message_type or f.enum_type)
                else "",
                "oneof": f.containing_oneof.name if f.containing_oneof else "",
            }
            for f in m.fields
        }
        for nested in m.nested_types:
            message(nested)
        for e in m.enum_types:
            enum(e)

    for m in file.message_types_by_name.values():
        message(m)
    for e in file.enum_types_by_name.values():
        enum(e)
    services = {
        s.full_name: {
            m.name: {
                "input": m.input_type.full_name,
                "output": m.output_type.full_name,
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            }
            for m in s.methods
        }
        for s in file.services_by_name.values()
    }
    return {"messages": messages, "enums": enums, "services": services}


def tritonclient_descriptors() -> dict[str, Any]:
    """tritonclient's generated descriptors, by proto file."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    return {
        "model_config": describe_file(model_config_pb2.DESCRIPTOR),
        "grpc_service": describe_file(service_pb2.DESCRIPTOR),
    }


if __name__ == "__main__":
    json.dump(tritonclient_descriptors(), sys.stdout)
