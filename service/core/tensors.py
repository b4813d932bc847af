"""Protocol-neutral tensor checks: plain inputs (name, datatype, shape, bytes or values) in,
batch-first arrays out, every client-controlled size checked before anything is allocated.

Both fronts use it: the gRPC codec (`raw_input_contents` / typed `contents`) and the HTTP codec
(JSON `data` lists / the binary tensor extension). Messages name the tensor and the field the
front says the data came from (`where`), so each protocol's users read their own words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidInput, shorten
from .signature import RequestedOutput, Signature, TensorSpec

CLASSIFICATION = "classification"

# Which numpy kinds a list of values may hold for each kind of datatype (ints are fine as floats).
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass(frozen=True)
class InputTensor:
    """One input as a front read it: `raw` bytes, or `values` (flat), or neither (`missing`)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Sequence[Any] | np.ndarray | None = None
    where: str = "data"  # how the front names the data field, for messages
    missing: str = "no data given"  # the message when neither raw nor values is set


@dataclass(frozen=True)
class OutputRequest:
    """One output a request names; `classes` > 0 asks for the top-k classification."""

    name: str
    classes: int = 0


def decode_inputs(
    tensors: Sequence[InputTensor], sig: Signature
) -> tuple[dict[str, np.ndarray], int]:
    """Check inputs against the signature; returns batch-first arrays and the batch size."""
    names = [t.name for t in tensors]
    if len(names) != len(sig.inputs) or set(names) != sig.inputs_by_name.keys():
        explain_input_names(names, sig)
    batch = -1
    checked: list[tuple[InputTensor, TensorSpec, int]] = []
    for tensor in tensors:  # every shape first: no data is touched before all shapes agree
        spec = sig.inputs_by_name[tensor.name]
        count, batch = check_shape(tensor, spec, sig, batch)
        checked.append((tensor, spec, count))
    arrays: dict[str, np.ndarray] = {}
    for tensor, spec, count in checked:
        array = to_array(tensor, spec, count)
        if spec.value_range is not None and count:
            low, high = spec.value_range
            if array.min() < low or array.max() >= high:
                raise InvalidInput(
                    f"input '{spec.name}': values must lie in [{low}, {high - 1}]; "
                    f"got {array.min()}..{array.max()}"
                )
        # Inside the server every array is batch-first; a model without a batch dim gets 1.
        shape = tensor.shape
        item = shape[1:] if sig.batching else shape
        target = (max(batch, 1), *_resolve(spec.model_dims, item))
        if not _fills(count, target):
            raise InvalidInput(
                f"input '{spec.name}': shape {list(shape)} holds {count} values, which the "
                f"model's reshape to {list(spec.model_dims)} cannot take"
            )
        arrays[spec.name] = array.reshape(target)
    return arrays, max(batch, 1)


def check_shape(
    tensor: InputTensor, spec: TensorSpec, sig: Signature, batch: int
) -> tuple[int, int]:
    """Datatype, shape and batch limits of one input; returns (element count, batch size)."""
    if tensor.datatype != spec.datatype:
        raise InvalidInput(
            f"input '{spec.name}': datatype {shorten(tensor.datatype) or '(empty)'} does not "
            f"match the model's {spec.datatype}"
        )
    shape = tensor.shape
    if sig.batching:
        if not shape or not spec.accepts(shape[1:]):
            raise InvalidInput(
                f"input '{spec.name}': shape {_show(shape)} does not match the model's "
                f"{[-1, *spec.dims]}"
            )
        n = shape[0]
        if n < 1:
            raise InvalidInput(f"input '{spec.name}': batch size {n} must be at least 1")
        if n > sig.max_batch_size:
            raise InvalidInput(
                f"input '{spec.name}': batch size {n} exceeds the model's max_batch_size "
                f"{sig.max_batch_size}"
            )
        if batch != -1 and n != batch:
            raise InvalidInput(
                f"input '{spec.name}': batch size {n} differs from the other inputs' {batch}"
            )
        batch = n
    elif not spec.accepts(shape):
        raise InvalidInput(
            f"input '{spec.name}': shape {_show(shape)} does not match the model's "
            f"{list(spec.dims)}"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{spec.name}': shape {_show(shape)} has a negative dim")
    return math.prod(shape), batch  # Python ints: no overflow, and nothing allocated yet


def _show(shape: Sequence[int]) -> str:
    return shorten(str(list(shape)))


def to_array(tensor: InputTensor, spec: TensorSpec, count: int) -> np.ndarray:
    """The input's data as a flat array of the model's dtype, its size checked against `count`."""
    if tensor.raw is not None:
        if tensor.values is not None:
            raise InvalidInput(f"input '{spec.name}': data given both as values and as bytes")
        expected = count * spec.dtype.itemsize
        if len(tensor.raw) != expected:
            raise InvalidInput(
                f"input '{spec.name}': {tensor.where} holds {len(tensor.raw)} bytes "
                f"but shape {_show(tensor.shape)} of {spec.datatype} needs {expected}"
            )
        return np.frombuffer(tensor.raw, dtype=spec.dtype)
    if tensor.values is None:
        raise InvalidInput(f"input '{spec.name}': {tensor.missing}")
    return values_array(tensor.values, spec, tensor.shape, count, tensor.where)


def values_array(
    values: Sequence[Any] | np.ndarray,
    spec: TensorSpec,
    shape: Sequence[int],
    count: int,
    where: str,
) -> np.ndarray:
    """A flat list of values as an array of the model's dtype: count, kind and range checked."""
    if len(values) != count:
        raise InvalidInput(
            f"input '{spec.name}': {where} holds {len(values)} values but shape {_show(shape)} "
            f"needs {count}"
        )
    if not count:
        return np.zeros(0, spec.dtype)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        array = np.asarray([], dtype=object)
    kinds = _ACCEPTED_KINDS.get(spec.dtype.kind, "")
    if array.dtype.kind not in kinds or array.shape != (count,):
        raise InvalidInput(
            f"input '{spec.name}': {where} must hold {count} {spec.datatype} values "
            f"(numbers{' or booleans' if spec.dtype.kind == 'b' else ''}, flat or nested "
            "in the tensor's shape)"
        )
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input '{spec.name}': {where} has values outside {spec.datatype}")
    return array.astype(spec.dtype, copy=False)


def explain_input_names(names: Sequence[str], sig: Signature) -> None:
    """Raise the InvalidInput that says what is wrong with a request's input names."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidInput(f"input '{shorten(name)}' is given more than once")
        seen.add(name)
        if name not in sig.inputs_by_name:
            raise InvalidInput(
                f"unknown input '{shorten(name)}'; the model's inputs are: "
                f"{', '.join(sig.inputs_by_name)}"
            )
    missing = [n for n in sig.inputs_by_name if n not in seen]
    raise InvalidInput(f"missing input(s): {', '.join(missing)}")


def _resolve(model_dims: tuple[int, ...], wire_item: Sequence[int]) -> tuple[int, ...]:
    """Model dims with variable (-1) entries filled in from the wire shape."""
    if -1 not in model_dims:
        return model_dims
    if len(model_dims) == len(wire_item):
        return tuple(w if d == -1 else d for d, w in zip(model_dims, wire_item, strict=True))
    return model_dims  # reshape with a variable dim: numpy infers the one -1


def _fills(count: int, shape: tuple[int, ...]) -> bool:
    """Whether `count` values fill `shape` exactly, one -1 taking the rest (as numpy reshapes)."""
    known = math.prod(d for d in shape if d != -1)
    variable = shape.count(-1)
    if variable == 0:
        return count == known
    return variable == 1 and known > 0 and count % known == 0


def select_outputs(requested: Sequence[OutputRequest], sig: Signature) -> list[RequestedOutput]:
    """The outputs a request asks for (all, when it names none), checked against the model."""
    if not requested:
        return [RequestedOutput(spec) for spec in sig.outputs]
    if len(requested) > len(sig.outputs):
        raise InvalidInput(
            f"{len(requested)} outputs requested; the model has {len(sig.outputs)}: "
            f"{', '.join(sig.outputs_by_name)}"
        )
    wanted: list[RequestedOutput] = []
    seen: set[str] = set()
    for out in requested:
        spec = sig.outputs_by_name.get(out.name)
        if spec is None:
            raise InvalidInput(
                f"unknown output '{shorten(out.name)}' requested; the model's outputs are: "
                f"{', '.join(sig.outputs_by_name)}"
            )
        if out.name in seen:
            raise InvalidInput(f"output '{out.name}' is requested more than once")
        seen.add(out.name)
        if out.classes < 0:
            raise InvalidInput(
                f"output '{out.name}': parameter '{CLASSIFICATION}' must be an integer >= 1"
            )
        if out.classes and len(spec.model_dims) != 1:
            raise InvalidInput(
                f"output '{out.name}': classification needs a vector output per item"
            )
        wanted.append(RequestedOutput(spec, out.classes))
    return wanted


def wire_shape(spec: TensorSpec, shape: tuple[int, ...], batching: bool) -> tuple[int, ...]:
    """The protocol shape of a batch-first output (no leading dim for a model without one)."""
    lead = shape[:1] if batching else ()
    if spec.dims == spec.model_dims:
        return lead + shape[1:]
    if -1 not in spec.dims:
        return lead + spec.dims
    known = int(np.prod([d for d in spec.dims if d != -1], dtype=np.int64))
    items = int(np.prod(shape[1:], dtype=np.int64))
    return lead + tuple(items // max(known, 1) if d == -1 else d for d in spec.dims)


def classify(
    array: np.ndarray, k: int, labels: Sequence[str], batching: bool
) -> tuple[list[str], tuple[int, ...]]:
    """Top-k as Triton's classification extension: "value:index[:label]" per class, best first."""
    rows = array.reshape(array.shape[0], -1)
    k = min(k, rows.shape[-1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    items: list[str] = []
    for row, indices in zip(rows, top, strict=True):
        for i in indices:
            text = f"{float(row[i]):f}:{int(i)}"
            if int(i) < len(labels):
                text += f":{labels[int(i)]}"
            items.append(text)
    shape = (rows.shape[0], k) if batching else (k,)
    return items, shape


@dataclass(frozen=True)
class OutputTensor:
    """One output ready to encode: its wire name, datatype and shape, and an array or strings."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    strings: list[str] | None = None  # BYTES (classification)


def prepare_outputs(
    outputs: Mapping[str, np.ndarray], wanted: Sequence[RequestedOutput], batching: bool
) -> list[OutputTensor]:
    """The wanted outputs in protocol terms: wire shapes, top-k classification as strings."""
    prepared: list[OutputTensor] = []
    for want in wanted:
        spec = want.spec
        array = outputs[spec.name]
        if want.classes:
            strings, shape = classify(array, want.classes, spec.labels, batching)
            prepared.append(OutputTensor(spec.name, "BYTES", shape, strings=strings))
        else:
            shape = wire_shape(spec, array.shape, batching)
            prepared.append(OutputTensor(spec.name, spec.datatype, shape, array=array))
    return prepared
