"""A model's tensors as the core sees them: datatypes, dims (with `reshape`), batching limit.

The protocol-free half of the codec: fronts check requests against a `Signature` and hand the core
batch-first arrays (`DecodedRequest`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelrepo.datatypes import CONFIG_DATATYPES, NUMPY_DTYPES
from pb import model_config_pb2 as mc


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: wire dims and model dims exclude the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    model_dims: tuple[int, ...]
    value_range: tuple[int, int] | None = None  # allowed integer values, [low, high)
    labels: tuple[str, ...] = ()
    dtype: np.dtype[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.datatype not in NUMPY_DTYPES:
            raise ValueError(f"tensor {self.name!r}: datatype {self.datatype} is not supported")
        object.__setattr__(self, "dtype", NUMPY_DTYPES[self.datatype])

    @classmethod
    def from_config(
        cls,
        tensor: mc.ModelInput | mc.ModelOutput,
        value_range: tuple[int, int] | None = None,
        labels: Sequence[str] = (),
    ) -> TensorSpec:
        """Build a spec from a config input or output, honouring its `reshape`."""
        dims = tuple(int(d) for d in tensor.dims)
        model_dims = (
            tuple(int(d) for d in tensor.reshape.shape) if tensor.HasField("reshape") else dims
        )
        return cls(
            name=tensor.name,
            datatype=CONFIG_DATATYPES.get(tensor.data_type, "INVALID"),
            dims=dims,
            model_dims=model_dims,
            value_range=value_range,
            labels=tuple(labels),
        )

    def accepts(self, item_shape: Sequence[int]) -> bool:
        """Whether one batch element of this shape fits the config dims (or the reshaped dims)."""
        return _matches(item_shape, self.dims) or _matches(item_shape, self.model_dims)


def _matches(shape: Sequence[int], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(
        d == -1 or s == d for s, d in zip(shape, dims, strict=True)
    )


@dataclass(frozen=True)
class Signature:
    """A model's tensors and batching limit, as the codec needs them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    inputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    outputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "outputs_by_name", {t.name: t for t in self.outputs})

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return; `classes` > 0 asks for the top-k classification instead of values."""

    spec: TensorSpec
    classes: int = 0


@dataclass
class DecodedRequest:
    """A request's inputs as batch-first arrays, its batch size and the outputs it wants."""

    inputs: dict[str, np.ndarray]
    batch_size: int
    outputs: list[RequestedOutput]
