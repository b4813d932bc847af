"""The export side of the repository's conventions: version folders and datatypes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from export.repository import next_version
from modelrepo.datatypes import DATATYPES, ONNX_TO_CONFIG
from pb import model_config_pb2 as mc


@pytest.mark.parametrize("stray", ["²", "v2", "٣", "99x", ".git"])
def test_next_version_ignores_stray_folders(tmp_path: Path, stray: str) -> None:
    assert next_version(tmp_path / "absent") == 1
    (tmp_path / "1").mkdir()
    (tmp_path / "3").mkdir()
    (tmp_path / stray).mkdir()
    (tmp_path / "7").write_text("a file, not a version folder")
    assert next_version(tmp_path) == 4


def test_the_datatype_table_matches_onnx_and_the_config_enum() -> None:
    names = {d.name for d in DATATYPES}
    assert len(names) == len(DATATYPES)
    for d in DATATYPES:
        onnx_name = onnx.TensorProto.DataType.Name(d.onnx)
        assert onnx_name == {
            "FP32": "FLOAT", "FP16": "FLOAT16", "FP64": "DOUBLE", "BYTES": "STRING",
            "BF16": "BFLOAT16",
        }.get(d.name, d.name), d  # fmt: skip
        config_name = mc.DataType.Name(d.config)
        assert config_name == ("TYPE_STRING" if d.name == "BYTES" else f"TYPE_{d.name}")
    every_config_type = {v for k, v in mc.DataType.items() if k != "TYPE_INVALID"}
    assert {d.config for d in DATATYPES} == every_config_type
    assert ONNX_TO_CONFIG[onnx.TensorProto.FLOAT] == mc.TYPE_FP32
