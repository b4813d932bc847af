"""Generates the `pb` package from proto/*.proto before setuptools collects the packages.

pyproject.toml holds the project's metadata; this file only makes the generated protobuf/gRPC
modules part of every install (editable or not) and of every wheel, so the installed commands
import from any directory. grpcio-tools comes from [build-system] requires.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _generate_pb() -> None:
    """Write pb/ when it is missing or older than a .proto file or the generator."""
    pb = ROOT / "pb" / "__init__.py"
    sources = [*ROOT.glob("proto/*.proto"), ROOT / "proto" / "generate.py"]
    if not sources[:-1]:  # an sdist without proto/: pb/ came with it
        return
    if pb.exists() and pb.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate  # proto/generate.py
    finally:
        sys.path.pop(0)
    generate.generate(ROOT / "pb")


_generate_pb()
setup()
