"""Property test of the codec: any ModelInferRequest decodes or is refused with a domain error.

Requests are drawn near the model's signature (right names, datatypes, shapes and byte lengths,
then bent) as well as far from it, so the checks deep in `decode_request` are reached. The default
profile runs in seconds; CODEC_EXAMPLES=20000 runs a longer search.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pb import grpc_service_pb2 as pb
from service.core.errors import ServingError
from service.core.signature import NUMPY_DTYPES, DecodedRequest, Signature, TensorSpec
from service.rpc.codec import CONTENTS_FIELDS, decode_request

settings.register_profile(
    "codec",
    max_examples=int(os.environ.get("CODEC_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIGNED_FIELDS = ("int_contents", "int64_contents")
LABELS = tuple(f"c{i}" for i in range(10))
PROBABILITIES = TensorSpec("probabilities", "FP32", (10,), (10,), labels=LABELS)
SIGNATURES = {
    "classifier": Signature(
        (TensorSpec("input", "FP32", (1, 4, 4), (1, 4, 4)),),
        (PROBABILITIES, TensorSpec("logits", "FP32", (10,), (10,))),
        max_batch_size=8,
    ),
    "explainer": Signature(
        (
            TensorSpec("input", "FP32", (1, 4, 4), (1, 4, 4)),
            TensorSpec("target_class", "INT64", (1,), (), value_range=(-1, 10)),
        ),
        (
            TensorSpec("cam", "FP32", (4, 4), (4, 4)),
            PROBABILITIES,
            TensorSpec("explained_class", "INT64", (1,), ()),
        ),
        max_batch_size=4,
    ),
    "no-batching": Signature(
        (
            TensorSpec("x", "INT32", (2, -1), (2, -1)),
            TensorSpec("flags", "BOOL", (3,), (3,)),
            TensorSpec("u", "UINT8", (-1,), (-1,), value_range=(0, 200)),
        ),
        (TensorSpec("y", "FP64", (-1,), (-1,)),),
        max_batch_size=0,
    ),
    "reshape": Signature(
        (
            TensorSpec("flat", "FP16", (16,), (1, 4, 4)),
            TensorSpec("pairs", "UINT64", (-1,), (-1, 2)),
            TensorSpec("wide", "INT16", (2, -1), (-1,)),
        ),
        (TensorSpec("out", "FP32", (-1,), (-1,)),),
        max_batch_size=3,
    ),
}
DATATYPES = [*NUMPY_DTYPES, "BYTES", "BF16", "", "fp32", "FP32 "]
HUGE = [2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), -1, -2]
PARAMETER_VALUES = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats(allow_nan=True)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=20)),
    st.just(pb.InferParameter()),
)
PARAMETERS = st.dictionaries(
    st.sampled_from(["classification", "priority", "timeout", "binary_data", "", "x" * 300]),
    PARAMETER_VALUES,
    max_size=3,
)


def _values(field: str, count: int) -> st.SearchStrategy[list[Any]]:
    """Values for a typed contents field: mostly in range, sometimes at or past its edges."""
    if field == "bool_contents":
        element: st.SearchStrategy[Any] = st.booleans()
    elif field == "int_contents":
        element = st.integers(-(2**31), 2**31 - 1)
    elif field == "int64_contents":
        element = st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**63 - 1))
    elif field == "uint_contents":
        element = st.integers(0, 2**32 - 1)
    elif field == "uint64_contents":
        element = st.integers(0, 2**64 - 1)
    elif field == "bytes_contents":
        element = st.binary(max_size=8)
    else:
        element = st.floats(width=32 if field == "fp32_contents" else 64)
    return st.lists(element, min_size=count, max_size=count)


@st.composite
def shapes(draw: st.DrawFn, spec: TensorSpec, sig: Signature, wild: bool) -> list[int]:
    """A wire shape for `spec`: a fitting one (dims or reshaped dims), then perhaps bent."""
    dims = draw(st.sampled_from([spec.dims, spec.model_dims]))
    shape = [draw(st.integers(0, 5)) if d == -1 else d for d in dims]
    if sig.batching:
        shape.insert(0, draw(st.integers(0, sig.max_batch_size + 1)))
    bend = draw(st.integers(0, 9)) if wild else -1
    if bend == 0 and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(HUGE))
    elif bend == 1:
        shape = draw(st.lists(st.integers(-2, 6), max_size=5))
    elif bend == 2 and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif bend == 3:
        shape.append(draw(st.integers(0, 3)))
    return shape


@st.composite
def requests(draw: st.DrawFn, sig: Signature) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=10)), id=draw(st.text(max_size=10))
    )
    # Half the requests are bent (wrong names, shapes, sizes...); the rest only vary within what
    # the model accepts, and mostly decode.
    wild = draw(st.booleans())

    def bend(odds: int) -> bool:
        return wild and draw(st.integers(0, odds - 1)) == 0

    for key, value in draw(PARAMETERS).items():
        request.parameters[key].CopyFrom(value)
    specs = list(sig.inputs)
    if bend(5):
        specs = draw(st.lists(st.sampled_from(specs), max_size=4))  # duplicates, omissions
    elif draw(st.booleans()):
        specs = draw(st.permutations(specs))
    modes = ["raw", "raw", "typed", "mixed", "none"] if wild else ["raw", "typed"]
    raw_mode = draw(st.sampled_from(modes))
    common_batch = draw(st.integers(1, max(sig.max_batch_size, 1)))
    for spec in specs:
        shape = draw(shapes(spec, sig, wild))
        if sig.batching and shape and (not wild or draw(st.booleans())):
            shape[0] = common_batch  # agree on the batch size more often than chance would
        name = draw(st.text(max_size=6)) if bend(8) else spec.name
        datatype = draw(st.sampled_from(DATATYPES)) if bend(8) else spec.datatype
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        for key, value in draw(PARAMETERS).items():
            tensor.parameters[key].CopyFrom(value)
        count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else draw(st.integers(0, 4))
        count = max(0, min(count, 256) + (draw(st.sampled_from([1, -1])) if bend(6) else 0))
        mode = raw_mode if raw_mode != "mixed" else draw(st.sampled_from(["raw", "typed"]))
        if not wild and datatype not in CONTENTS_FIELDS:
            mode = "raw"
        in_range = spec.value_range is not None and (not wild or draw(st.booleans()))
        if mode == "raw":
            size = count * NUMPY_DTYPES.get(datatype, np.dtype("u1")).itemsize
            size = max(0, size + (draw(st.sampled_from([1, -1, 3])) if bend(6) else 0))
            if in_range and spec.value_range is not None:
                low, high = spec.value_range
                low, high = (low - 1, high) if wild else (low, high - 1)
                values = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
                data = np.asarray(values).astype(spec.dtype).tobytes()
            else:
                data = draw(st.binary(min_size=size, max_size=size))
            request.raw_input_contents.append(data)
        elif mode == "typed":
            field = CONTENTS_FIELDS.get(datatype) or draw(
                st.sampled_from(sorted(set(CONTENTS_FIELDS.values())))
            )
            # in-range class indices only fit a signed integer field (a wild datatype may not)
            if in_range and spec.value_range is not None and field in SIGNED_FIELDS:
                low, high = spec.value_range
                values = draw(st.lists(st.integers(low, high - 1), min_size=count, max_size=count))
            else:
                values = draw(_values(field, count))
            getattr(tensor.contents, field).extend(values)
            if bend(8):  # a second field as well
                other = draw(st.sampled_from(sorted(set(CONTENTS_FIELDS.values()))))
                getattr(tensor.contents, other).extend(draw(_values(other, 2)))
    if bend(8):
        extra = draw(st.lists(st.binary(max_size=8), max_size=3))
        request.raw_input_contents.extend(extra)  # a count that does not match the inputs
    names = [o.name for o in sig.outputs]
    if wild:
        wanted_names = draw(st.lists(st.sampled_from([*names, "", "nope", "x" * 300]), max_size=5))
    else:
        wanted_names = draw(st.lists(st.sampled_from(names), unique=True))
    for name in wanted_names:
        wanted = request.outputs.add(name=name)
        if wild:
            for key, value in draw(PARAMETERS).items():
                wanted.parameters[key].CopyFrom(value)
        elif draw(st.booleans()):
            wanted.parameters["classification"].int64_param = draw(st.integers(1, 12))
    return request


def _check_decoded(decoded: DecodedRequest, sig: Signature) -> None:
    """What a successful decode promises the layers below."""
    assert 1 <= decoded.batch_size <= max(sig.max_batch_size, 1)
    assert decoded.inputs.keys() == sig.inputs_by_name.keys()
    for name, array in decoded.inputs.items():
        spec = sig.inputs_by_name[name]
        assert array.dtype == spec.dtype
        assert array.shape[0] == decoded.batch_size
        assert len(array.shape) == 1 + len(spec.model_dims)
        assert all(d in (-1, s) for d, s in zip(spec.model_dims, array.shape[1:], strict=True))
        if spec.value_range is not None and array.size:
            assert spec.value_range[0] <= array.min() and array.max() < spec.value_range[1]
    names = [wanted.spec.name for wanted in decoded.outputs]
    assert len(names) == len(set(names)) and set(names) <= sig.outputs_by_name.keys()


@settings.get_profile("codec")  # type: ignore[misc]
@given(data=st.data(), which=st.sampled_from(sorted(SIGNATURES)))
def test_any_request_decodes_or_is_refused_with_a_domain_error(
    data: st.DataObject, which: str
) -> None:
    sig = SIGNATURES[which]
    request = data.draw(requests(sig))
    # Also through the wire: what the server sees is a parsed copy of the bytes.
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    try:
        decoded = decode_request(request, sig)
    except ServingError as exc:
        event(f"{which}: {type(exc).__name__}")
        return
    event(f"{which}: decoded")
    _check_decoded(decoded, sig)
