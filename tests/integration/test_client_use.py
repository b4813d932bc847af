"""What a person using the client and the explain API meets, against a real server."""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from service.core.errors import InvalidInput
from tests.conftest import ROOT
from tests.support.harness import ServerThread, infer_request, running_server, stub
from training.mnist import load_mnist

EXPLAINER = "mnist_cnn_gradcam"


@pytest.fixture(scope="module")
def server(mnist_repository: Path) -> Iterator[ServerThread]:
    with running_server(mnist_repository) as thread:
        yield thread


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist("test")
    return images[:16], labels[:16]


def _png(pixels: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(np.kron(pixels, np.ones((scale, scale), dtype=np.uint8)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _cli(server: ServerThread, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", "--url", server.address, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# The explainer given where a classifier is expected: every path names the missing input.


def _explain_error(server: ServerThread, request: ex.ExplainRequest) -> grpc.RpcError:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
        ex_grpc.ExplainerStub(channel).Explain(request, timeout=30)
    return err.value


def test_classifying_the_explainer_names_the_missing_input(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    image = _png(digits[0][0])
    error = _explain_error(
        server, ex.ExplainRequest(model_name=EXPLAINER, image=image, predictions_only=True)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input(s): target_class" in (error.details() or "")


def test_explaining_with_the_explainers_name_points_to_the_classifier(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    error = _explain_error(
        server, ex.ExplainRequest(model_name=EXPLAINER, image=_png(digits[0][0]))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'mnist_cnn'" in (error.details() or "")


def test_model_infer_unary_and_stream_name_the_missing_input(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    request = infer_request(EXPLAINER, digits[0][:1, None].astype(np.float32) / 255.0)
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "target_class" in (err.value.details() or "")
        (answer,) = stub(channel).ModelStreamInfer(iter([request]), timeout=30)
    assert "missing input(s): target_class" in answer.error_message


def test_a_served_model_called_without_an_input_refuses_before_running(
    server: ServerThread,
) -> None:
    assert server.server is not None
    _, model = server.server.repository.get(EXPLAINER, "")
    pixels = np.zeros((1, 1, 28, 28), dtype=np.float32)
    with pytest.raises(InvalidInput, match="missing input\\(s\\): target_class"):
        server.call(model.infer({"input": pixels}, 1, 10.0))


def test_the_client_cli_classifying_the_explainer_says_what_is_missing(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(_png(digits[0][0]))
    result = _cli(server, "classify", str(image), "--model", EXPLAINER)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "target_class" in result.stderr


def test_a_turned_phone_photo_of_a_digit_classifies_right(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """A dark digit on paper, stored turned 90° with EXIF orientation 6, as phones do."""
    right = 0
    with server.channel() as channel:
        explainer = ex_grpc.ExplainerStub(channel)
        for pixels, label in zip(*digits, strict=True):
            upright = np.kron(255 - pixels, np.ones((8, 8), dtype=np.uint8))
            exif = Image.Exif()
            exif[0x0112] = 6  # turn 90° clockwise to view
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
                buffer, format="JPEG", quality=90, exif=exif
            )
            request = ex.ExplainRequest(
                model_name="mnist_cnn", image=buffer.getvalue(), predictions_only=True
            )
            top = explainer.Explain(request, timeout=30).predictions[0]
            right += top.class_index == label
    assert right >= len(digits[1]) - 1, f"{right} of {len(digits[1])} right"


# explain-dir: one overlay per picture and class, every picture in the CSV, no silent mixing.


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_explain_dir_keeps_every_picture_apart_and_lists_every_overlay_and_failure(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(digits[0][0], scale=2))
    Image.fromarray(np.kron(digits[0][1], np.ones((2, 2), np.uint8))).save(folder / "a.jpg")
    (folder / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "out"
    result = _cli(
        server, "explain-dir", str(folder), "--out-dir", str(out), "--top-k", "2", "--quiet"
    )
    assert result.returncode == 1, result.stderr  # one picture failed
    assert "2 of 3" in result.stdout and "1 failed" in result.stdout
    rows = _read_csv(out / "predictions.csv")
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    assert sorted(by_image) == ["a.jpg", "a.png", "broken.png"]
    assert len(by_image["a.png"]) == 2 and len(by_image["a.jpg"]) == 2
    assert [r["rank"] for r in by_image["a.png"]] == ["1", "2"]
    overlays = [r["overlay"] for r in rows if r["overlay"]]
    assert len(set(overlays)) == 4 and all((out / o).is_file() for o in overlays)
    (failed,) = by_image["broken.png"]
    assert failed["error"].startswith("INVALID_ARGUMENT") and not failed["overlay"]
    assert str(digits[1][0]) == by_image["a.png"][0]["label"]
    assert str(digits[1][1]) == by_image["a.jpg"][0]["label"]


def test_explain_dir_refuses_a_used_out_dir_unless_overwrite_replaces_the_earlier_run(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(2):
        (folder / f"d{i}.png").write_bytes(_png(digits[0][i]))
    out = tmp_path / "out"
    args = ["explain-dir", str(folder), "--out-dir", str(out), "--quiet"]
    assert _cli(server, *args, "--top-k", "2").returncode == 0
    first = sorted(p.name for p in out.iterdir())
    assert len(first) == 5  # 2 pictures x 2 classes + the CSV
    again = _cli(server, *args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == first
    (folder / "d0.png").unlink()
    assert _cli(server, *args, "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["d1_png.png", "predictions.csv"]
    stranger = tmp_path / "not-ours"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    refused = _cli(server, "explain-dir", str(folder), "--out-dir", str(stranger), "--overwrite")
    assert refused.returncode == 2 and "predictions.csv" in refused.stderr
    assert (stranger / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: (p / "one.png").write_bytes(b"x") and p / "one.png", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no PNG or JPEG files"),
    ],
    ids=["missing", "file", "empty"],
)
def test_explain_dir_says_why_it_found_no_pictures(
    server: ServerThread, tmp_path: Path, make: Any, says: str
) -> None:
    result = _cli(server, "explain-dir", str(make(tmp_path)), "--out-dir", str(tmp_path / "o"))
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_explain_out_jpg_writes_a_jpeg(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(_png(digits[0][0], scale=4))
    out = tmp_path / "overlay.jpg"
    result = _cli(server, "explain", str(image), "--out", str(out))
    assert result.returncode == 0, result.stderr
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.width >= 224 and img.height > img.width


def test_a_refused_connection_names_the_address_and_the_fix(tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(_png(np.zeros((28, 28), np.uint8)))
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    result = subprocess.run(
        [sys.executable, "-m", "client", "--url", f"http://{address}", "classify", str(image)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert address in result.stderr and "CNNSERVE_URL" in result.stderr
    assert "make serve" in result.stderr


# Pictures people can read: annotated overlays, one scale for a request's classes, warnings.


def _heat(png: bytes) -> float:
    """How hot an overlay looks: the mean of red minus blue."""
    with Image.open(io.BytesIO(png)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return float((rgb[..., 0] - rgb[..., 2]).mean())


def _explain(server: ServerThread, **fields: Any) -> ex.ExplainResponse:
    with server.channel() as channel:
        request = ex.ExplainRequest(model_name="mnist_cnn", **fields)
        return ex_grpc.ExplainerStub(channel).Explain(request, timeout=60)


def test_a_shared_scale_keeps_only_the_largest_map_as_it_was(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    image = _png(digits[0][0], scale=4)
    own = _explain(server, image=image, top_k=3, annotated=True)
    shared = _explain(
        server, image=image, top_k=3, annotated=True, heatmap_scale=ex.HEATMAP_SCALE_SHARED
    )
    assert own.heatmap_scale == ex.HEATMAP_SCALE_PER_CLASS
    assert shared.heatmap_scale == ex.HEATMAP_SCALE_SHARED
    for a, b in zip(own.explanations, shared.explanations, strict=True):
        assert a.heatmap == b.heatmap  # the values stay per class; only the pictures change
    # On one scale, the class holding the request's largest raw value keeps its full range and
    # looks as it does on its own scale; the others change (which class that is depends on the
    # model, not on its probability; the arithmetic is unit-tested in test_imaging).
    shared_heat = [_heat(e.overlay_png) for e in shared.explanations]
    own_heat = [_heat(e.overlay_png) for e in own.explanations]
    same = [abs(s - o) < 1.0 for s, o in zip(shared_heat, own_heat, strict=True)]
    assert sum(same) == 1, (shared_heat, own_heat)
    for explanation in shared.explanations:
        with Image.open(io.BytesIO(explanation.annotated_png)) as img:
            assert img.width >= 224 and img.height > img.width  # the caption under the picture


def test_not_a_digit_comes_back_with_a_warning_and_a_visible_note(server: ServerThread) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buffer, format="PNG")
    blank = _explain(server, image=buffer.getvalue(), annotated=True)
    assert any("blank" in w for w in blank.warnings)
    plain = _explain(server, image=buffer.getvalue())
    assert not plain.explanations[0].annotated_png and plain.warnings == blank.warnings
    only = _explain(server, image=buffer.getvalue(), predictions_only=True)
    assert only.warnings == blank.warnings
    with Image.open(io.BytesIO(blank.explanations[0].annotated_png)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    note_red = (rgb[..., 0] > 140) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    assert note_red[64:].any()  # the note, in red under the picture


def test_an_inverted_picture_says_so_and_a_5x5_one_gets_a_readable_overlay(
    server: ServerThread, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    paper = _explain(server, image=_png(255 - digits[0][0], scale=3))
    assert paper.inverted
    assert not _explain(server, image=_png(digits[0][0], scale=3)).inverted
    tiny = np.asarray(Image.fromarray(digits[0][0]).resize((5, 5), Image.Resampling.BOX))
    small = _explain(server, image=_png(tiny), annotated=True)
    assert any("5x5" in w for w in small.warnings)
    with Image.open(io.BytesIO(small.explanations[0].overlay_png)) as img:
        assert img.size == (5, 5)  # the raw overlay keeps the picture's size
    with Image.open(io.BytesIO(small.explanations[0].annotated_png)) as img:
        assert min(img.size) >= 224


def test_the_client_writes_the_annotated_overlay_and_prints_the_warnings(
    server: ServerThread, tmp_path: Path
) -> None:
    image = tmp_path / "blank.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(image)
    out = tmp_path / "overlay.png"
    result = _cli(server, "explain", str(image), "--out", str(out), "--scale", "shared")
    assert result.returncode == 0, result.stderr
    assert "warning: the picture is blank" in result.stdout
    with Image.open(out) as img:
        assert img.width >= 224 and img.height > img.width
