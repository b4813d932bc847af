"""Every explanation method on a few test digits, for each model of a repository: one figure.

    .venv/bin/python -m bench.methods_figure --repository model_repository --models mnist_cnn,lenet5

Starts the server on the repository, asks the explain API for each method the explainer offers
(the predicted class of each digit), and draws one row per (model, digit) and one column per
method, the overlays as the server draws them. Writes docs/explanation_methods.png.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from bench.loadgen import ROOT, running_server
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from training.cli import HelpFormatter
from training.mnist import load_mnist

METHODS = (
    "gradcam", "hirescam", "gradcam_elementwise", "gradcam_plusplus", "xgradcam", "layercam",
    "eigengradcam", "eigencam", "scorecam", "ablationcam", "saliency", "integrated_gradients",
)  # fmt: skip
TILE, LABEL_W, HEADER_H = 96, 120, 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help="model repository with the models' explainers")  # fmt: skip
    parser.add_argument("--models", default="mnist_cnn", help="comma-separated models")
    parser.add_argument("--digits", type=int, default=3, help="test digits per model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "explanation_methods.png",
                        help="the figure")  # fmt: skip
    return parser.parse_args(argv)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    images, labels = load_mnist("test")
    picked = range(args.digits)
    rows: list[tuple[str, list[Image.Image | None]]] = []
    with (
        running_server(args.repository, "--http-port", "-1") as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = ex_grpc.ExplainerStub(channel)
        for model in models:
            for i in picked:
                tiles: list[Image.Image | None] = []
                label = ""
                for method in METHODS:
                    request = ex.ExplainRequest(
                        model_name=model, image=_png(images[i]), method=method
                    )
                    try:
                        response = stub.Explain(request, timeout=120)
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                        tiles.append(None)  # not offered by this explainer
                        continue
                    best = response.predictions[0]
                    label = f"{model}\ndigit {labels[i]}\nsaid {best.label} {best.probability:.0%}"
                    overlay = response.explanations[0].overlay_png
                    tiles.append(Image.open(io.BytesIO(overlay)).convert("RGB"))
                rows.append((label, tiles))
                print(f"{model}, test digit {i}: {sum(t is not None for t in tiles)} methods")
    width, height = LABEL_W + TILE * len(METHODS), HEADER_H + TILE * len(rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for column, method in enumerate(METHODS):
        x = LABEL_W + column * TILE
        draw.text((x + 2, 2), method.replace("_", "\n", 1), fill="black")
    for r, (label, tiles) in enumerate(rows):
        y = HEADER_H + r * TILE
        draw.text((4, y + 4), label, fill="black")
        for column, tile in enumerate(tiles):
            x = LABEL_W + column * TILE
            if tile is None:
                draw.text((x + 8, y + TILE // 2), "not offered", fill="grey")
            else:
                sheet.paste(tile.resize((TILE - 2, TILE - 2)), (x + 1, y + 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
