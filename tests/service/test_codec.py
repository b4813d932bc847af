"""Unit tests for service.rpc.codec: decoding, validation messages, reshape, encoding, top-k."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pb import grpc_service_pb2 as pb
from pb import model_config_pb2 as mc
from service.core.errors import InvalidInput
from service.core.signature import CONFIG_DATATYPES, Signature, TensorSpec
from service.rpc import codec
from service.rpc.codec import decode_bytes_tensor, decode_request, encode_response

IMAGE = TensorSpec("input", "FP32", (1, 28, 28), (1, 28, 28))
TARGET = TensorSpec("target_class", "INT64", (1,), (), value_range=(-1, 10))
LOGITS = TensorSpec("logits", "FP32", (10,), (10,), labels=tuple(f"c{i}" for i in range(10)))
EXPLAINED = TensorSpec("explained_class", "INT64", (1,), ())
CLASSIFIER = Signature((IMAGE,), (LOGITS,), max_batch_size=8)
EXPLAINER = Signature((IMAGE, TARGET), (LOGITS, EXPLAINED), max_batch_size=8)


def request_with(
    *tensors: tuple[str, str, list[int], bytes | None], outputs: tuple[str, ...] = ()
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw is not None:
            request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def image_bytes(n: int) -> bytes:
    return np.arange(n * 784, dtype=np.float32).tobytes()


def test_config_datatypes_cover_the_protocol_names() -> None:
    assert CONFIG_DATATYPES[mc.TYPE_FP32] == "FP32"
    assert CONFIG_DATATYPES[mc.TYPE_INT64] == "INT64"
    assert CONFIG_DATATYPES[mc.TYPE_STRING] == "BYTES"


def test_raw_input_decodes_to_the_right_array() -> None:
    decoded = decode_request(
        request_with(("input", "FP32", [3, 1, 28, 28], image_bytes(3))), CLASSIFIER
    )
    assert decoded.batch_size == 3
    array = decoded.inputs["input"]
    assert array.shape == (3, 1, 28, 28) and array.dtype == np.float32
    np.testing.assert_array_equal(array.ravel(), np.arange(3 * 784, dtype=np.float32))
    assert [o.spec.name for o in decoded.outputs] == ["logits"]


def test_typed_contents_are_accepted() -> None:
    request = request_with(("input", "FP32", [1, 1, 28, 28], None))
    request.inputs[0].contents.fp32_contents.extend([0.5] * 784)
    decoded = decode_request(request, CLASSIFIER)
    assert decoded.inputs["input"].dtype == np.float32
    assert float(decoded.inputs["input"].mean()) == 0.5


def test_reshape_is_applied_both_ways() -> None:
    target = np.array([[-1], [3]], dtype=np.int64)
    request = request_with(
        ("input", "FP32", [2, 1, 28, 28], image_bytes(2)),
        ("target_class", "INT64", [2, 1], target.tobytes()),
    )
    decoded = decode_request(request, EXPLAINER)
    assert decoded.inputs["target_class"].shape == (2,)
    response = encode_response(
        request,
        "1",
        {"logits": np.zeros((2, 10), np.float32), "explained_class": np.array([4, 3])},
        decoded.outputs,
        batching=True,
    )
    shapes = {o.name: list(o.shape) for o in response.outputs}
    assert shapes == {"logits": [2, 10], "explained_class": [2, 1]}
    assert np.frombuffer(response.raw_output_contents[1], np.int64).tolist() == [4, 3]


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((("input", "FP64", [1, 1, 28, 28], image_bytes(1)),), "datatype FP64"),
        ((("input", "FP32", [1, 28, 28], image_bytes(1)),), "shape [1, 28, 28]"),
        ((("input", "FP32", [1, 1, 28, 27], image_bytes(1)),), "shape"),
        ((("input", "FP32", [1, 1, 28, 28], image_bytes(1)[:-4]),), "3132 bytes"),
        ((("input", "FP32", [9, 1, 28, 28], image_bytes(9)),), "max_batch_size 8"),
        ((("input", "FP32", [0, 1, 28, 28], b""),), "batch size 0"),
        ((), "missing input(s): input"),
        (
            (
                ("input", "FP32", [1, 1, 28, 28], image_bytes(1)),
                ("extra", "FP32", [1], b"\0\0\0\0"),
            ),
            "unknown input 'extra'",
        ),
        (
            (
                ("input", "FP32", [1, 1, 28, 28], image_bytes(1)),
                ("input", "FP32", [1, 1, 28, 28], image_bytes(1)),
            ),
            "more than once",
        ),
    ],
)
def test_bad_inputs_name_the_problem(tensors: tuple, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_request(request_with(*tensors), CLASSIFIER)


def test_raw_and_inputs_count_must_agree() -> None:
    request = request_with(("input", "FP32", [1, 1, 28, 28], image_bytes(1)))
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput, match="raw_input_contents has 2 entries"):
        decode_request(request, CLASSIFIER)


def test_contents_count_is_checked() -> None:
    request = request_with(("input", "FP32", [1, 1, 28, 28], None))
    request.inputs[0].contents.fp32_contents.extend([0.0] * 10)
    with pytest.raises(InvalidInput, match=r"contents\.fp32_contents holds 10 values"):
        decode_request(request, CLASSIFIER)


def test_unknown_output_is_rejected() -> None:
    request = request_with(("input", "FP32", [1, 1, 28, 28], image_bytes(1)), outputs=("nope",))
    with pytest.raises(InvalidInput, match="unknown output 'nope'"):
        decode_request(request, CLASSIFIER)


@pytest.mark.parametrize("target", [10, -2, 99])
def test_class_index_outside_range_is_rejected(target: int) -> None:
    request = request_with(
        ("input", "FP32", [1, 1, 28, 28], image_bytes(1)),
        ("target_class", "INT64", [1, 1], np.array([target], np.int64).tobytes()),
    )
    with pytest.raises(InvalidInput, match=r"target_class.*\[-1, 9\]"):
        decode_request(request, EXPLAINER)


def test_classification_returns_top_k_with_labels() -> None:
    request = request_with(("input", "FP32", [2, 1, 28, 28], image_bytes(2)))
    wanted = request.outputs.add(name="logits")
    wanted.parameters["classification"].int64_param = 3
    decoded = decode_request(request, CLASSIFIER)
    logits = np.array([np.arange(10), np.arange(10)[::-1]], dtype=np.float32)
    response = encode_response(request, "1", {"logits": logits}, decoded.outputs, batching=True)
    assert response.outputs[0].datatype == "BYTES"
    assert list(response.outputs[0].shape) == [2, 3]
    items = decode_bytes_tensor(response.raw_output_contents[0])
    assert items[0] == b"9.000000:9:c9"
    assert items[3] == b"9.000000:0:c0"
    assert len(items) == 6


def test_classification_needs_a_positive_count() -> None:
    request = request_with(("input", "FP32", [1, 1, 28, 28], image_bytes(1)))
    request.outputs.add(name="logits").parameters["classification"].int64_param = 0
    with pytest.raises(InvalidInput, match="classification"):
        decode_request(request, CLASSIFIER)


def _general(request: pb.ModelInferRequest, sig: Signature, monkeypatch: pytest.MonkeyPatch):
    """decode_request with its shortcut for the common request turned off."""
    with monkeypatch.context() as patch:
        patch.setattr(codec, "_decode_plain", lambda request, sig: None)
        try:
            return decode_request(request, sig)
        except InvalidInput as exc:
            return exc


@pytest.mark.parametrize(
    "tensors",
    [
        [("input", "FP32", [1, 1, 28, 28], image_bytes(1))],
        [("input", "FP32", [8, 1, 28, 28], image_bytes(8))],
        [("input", "FP32", [9, 1, 28, 28], image_bytes(9))],  # over max_batch_size
        [("input", "FP32", [0, 1, 28, 28], b"")],
        [("input", "FP32", [2, 1, 28, 28], image_bytes(1))],  # too few bytes
        [("input", "FP64", [1, 1, 28, 28], image_bytes(2))],
        [("image", "FP32", [1, 1, 28, 28], image_bytes(1))],
        [("input", "FP32", [1, 28, 28], image_bytes(1))],
        [("input", "FP32", [1, 1, 28, 28, 1], image_bytes(1))],
        [("input", "FP32", [], b"")],
        [("input", "FP32", [1, 1, 28, 28], image_bytes(1))] * 2,
    ],
)
def test_the_shortcut_decodes_exactly_as_the_general_path(
    tensors: list[tuple[str, str, list[int], bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = request_with(*tensors)
    general = _general(request, CLASSIFIER, monkeypatch)
    try:
        decoded = decode_request(request, CLASSIFIER)
    except InvalidInput as exc:  # anything unusual goes the general way and fails as it did
        assert isinstance(general, InvalidInput) and str(exc) == str(general)
        assert codec._decode_plain(request, CLASSIFIER) is None
        return
    assert not isinstance(general, InvalidInput)
    assert decoded.batch_size == general.batch_size
    assert decoded.outputs == general.outputs
    assert decoded.inputs.keys() == general.inputs.keys()
    for name, array in general.inputs.items():
        assert decoded.inputs[name].shape == array.shape
        assert decoded.inputs[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.inputs[name], array)


def test_the_shortcut_takes_the_common_request_and_leaves_the_rest() -> None:
    plain = request_with(("input", "FP32", [2, 1, 28, 28], image_bytes(2)))
    assert codec._decode_plain(plain, CLASSIFIER) is not None
    assert codec._decode_plain(plain, EXPLAINER) is None  # two inputs, one with a value range
    named = request_with(("input", "FP32", [2, 1, 28, 28], image_bytes(2)), outputs=("logits",))
    assert codec._decode_plain(named, CLASSIFIER) is None
    both = request_with(("input", "FP32", [1, 1, 28, 28], image_bytes(1)))
    both.inputs[0].contents.fp32_contents.append(1.0)
    assert codec._decode_plain(both, CLASSIFIER) is None
    with pytest.raises(InvalidInput, match="both in contents and raw_input_contents"):
        decode_request(both, CLASSIFIER)
    reshaped = Signature((TensorSpec("input", "FP32", (784,), (1, 28, 28)),), (LOGITS,), 8)
    flat = request_with(("input", "FP32", [1, 784], image_bytes(1)))
    assert codec._decode_plain(flat, reshaped) is None
    assert decode_request(flat, reshaped).inputs["input"].shape == (1, 1, 28, 28)
