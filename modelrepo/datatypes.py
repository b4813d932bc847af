"""Tensor datatypes: one table from the protocol's names to each other spelling of them.

The Open Inference Protocol names a datatype (FP32); config.pbtxt has its enum (TYPE_FP32, and
TYPE_STRING for BYTES); numpy its dtype (little-endian); ONNX Runtime a type string
(tensor(float)); ONNX graphs an element type (TensorProto.FLOAT, written here as its number so
this module needs no onnx). Every other table is derived from `DATATYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pb import model_config_pb2 as mc


@dataclass(frozen=True)
class Datatype:
    """One datatype in every spelling; `numpy` is None where numpy has no twin (BF16, BYTES)."""

    name: str
    config: int
    numpy: np.dtype[Any] | None
    ort: str
    onnx: int


DATATYPES: tuple[Datatype, ...] = (
    Datatype("BOOL", mc.TYPE_BOOL, np.dtype(np.bool_), "tensor(bool)", 9),
    Datatype("UINT8", mc.TYPE_UINT8, np.dtype("<u1"), "tensor(uint8)", 2),
    Datatype("UINT16", mc.TYPE_UINT16, np.dtype("<u2"), "tensor(uint16)", 4),
    Datatype("UINT32", mc.TYPE_UINT32, np.dtype("<u4"), "tensor(uint32)", 12),
    Datatype("UINT64", mc.TYPE_UINT64, np.dtype("<u8"), "tensor(uint64)", 13),
    Datatype("INT8", mc.TYPE_INT8, np.dtype("<i1"), "tensor(int8)", 3),
    Datatype("INT16", mc.TYPE_INT16, np.dtype("<i2"), "tensor(int16)", 5),
    Datatype("INT32", mc.TYPE_INT32, np.dtype("<i4"), "tensor(int32)", 6),
    Datatype("INT64", mc.TYPE_INT64, np.dtype("<i8"), "tensor(int64)", 7),
    Datatype("FP16", mc.TYPE_FP16, np.dtype("<f2"), "tensor(float16)", 10),
    Datatype("FP32", mc.TYPE_FP32, np.dtype("<f4"), "tensor(float)", 1),
    Datatype("FP64", mc.TYPE_FP64, np.dtype("<f8"), "tensor(double)", 11),
    Datatype("BYTES", mc.TYPE_STRING, None, "tensor(string)", 8),
    Datatype("BF16", mc.TYPE_BF16, None, "tensor(bfloat16)", 16),
)

# Protocol datatype name -> numpy dtype (little-endian). BF16 and BYTES have no numpy twin here.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {d.name: d.numpy for d in DATATYPES if d.numpy is not None}
# Config enum (TYPE_FP32) -> protocol name (FP32); Triton calls TYPE_STRING "BYTES" on the wire.
CONFIG_DATATYPES: dict[int, str] = {d.config: d.name for d in DATATYPES}
# ONNX Runtime's type strings -> protocol datatypes.
ORT_DATATYPES: dict[str, str] = {d.ort: d.name for d in DATATYPES}
# ONNX element type (TensorProto.FLOAT) -> config enum (TYPE_FP32).
ONNX_TO_CONFIG: dict[int, int] = {d.onnx: d.config for d in DATATYPES}
