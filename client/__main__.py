"""`python -m client`: classify an image, explain it, or explain a whole directory.

python -m client classify digit.png
python -m client explain digit.png --out overlay.png --top-k 3 --feature-maps maps.png
python -m client explain-dir photos/ --out-dir overlays/
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
POLARITIES = {"auto": ex.POLARITY_AUTO, "as-is": ex.POLARITY_AS_IS, "invert": ex.POLARITY_INVERT}


def _request(args: argparse.Namespace, image: Path, predictions_only: bool) -> ex.ExplainRequest:
    request = ex.ExplainRequest(
        model_name=args.model,
        model_version=args.model_version,
        image=image.read_bytes(),
        top_k=args.top_k,
        polarity=POLARITIES[args.polarity],
        predictions_only=predictions_only,
    )
    if not predictions_only:
        request.target_classes.extend(args.target or [])
        request.feature_maps = bool(getattr(args, "feature_maps", None))
    return request


def _print_predictions(name: str, response: ex.ExplainResponse) -> None:
    ranked = ", ".join(f"{p.label} ({100 * p.probability:.1f}%)" for p in response.predictions)
    print(f"{name}: {ranked}")


def _write_overlays(response: ex.ExplainResponse, out: Path) -> list[Path]:
    """One PNG per explanation: `out` itself for a single one, `<stem>_<label>.png` for several."""
    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for explanation in response.explanations:
        path = out
        if len(response.explanations) > 1:
            path = out.with_name(f"{out.stem}_{explanation.target.label}{out.suffix}")
        path.write_bytes(explanation.overlay_png)
        written.append(path)
    return written


def classify(stub: ex_grpc.ExplainerStub, args: argparse.Namespace) -> int:
    response = stub.Explain(_request(args, args.image, predictions_only=True), timeout=args.timeout)
    _print_predictions(str(args.image), response)
    return 0


def explain(stub: ex_grpc.ExplainerStub, args: argparse.Namespace) -> int:
    response = stub.Explain(
        _request(args, args.image, predictions_only=False), timeout=args.timeout
    )
    _print_predictions(str(args.image), response)
    out = args.out or args.image.with_name(f"{args.image.stem}_gradcam.png")
    for path, explanation in zip(
        _write_overlays(response, out), response.explanations, strict=True
    ):
        print(f"  Grad-CAM for class {explanation.target.label} ({response.target_layer}): {path}")
    if args.feature_maps:
        args.feature_maps.write_bytes(response.feature_maps_png)
        print(f"  feature maps of {response.target_layer}: {args.feature_maps}")
    return 0


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _progress(items: Sequence[Path], quiet: bool) -> Iterable[Path]:
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        return items
    return tqdm(items, unit="image", disable=quiet)


def explain_dir(stub: ex_grpc.ExplainerStub, args: argparse.Namespace) -> int:
    images = _images(args.directory)
    if not images:
        print(f"no PNG or JPEG files under {args.directory}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    rows = ["image,predicted,probability,overlay"]
    for image in _progress(images, args.quiet):
        relative = image.relative_to(args.directory)
        try:
            response = stub.Explain(_request(args, image, False), timeout=args.timeout)
        except grpc.RpcError as exc:
            failures += 1
            print(f"\n{relative}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            continue
        out = args.out_dir / relative.with_suffix(".png")
        paths = _write_overlays(response, out)
        top = response.predictions[0]
        rows.append(
            f"{relative},{top.label},{top.probability:.4f},{paths[0].relative_to(args.out_dir)}"
        )
    (args.out_dir / "predictions.csv").write_text("\n".join(rows) + "\n")
    print(
        f"explained {len(images) - failures} of {len(images)} images into {args.out_dir} "
        f"(predictions.csv lists them)"
    )
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Classify and explain images with a running cnnserve server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("CNNSERVE_URL", "127.0.0.1:8001"),
        help="server address (env CNNSERVE_URL)",
    )
    parser.add_argument("--model", default="mnist_cnn", help="classifier name")
    parser.add_argument("--model-version", default="", help="model version (default: the latest)")
    parser.add_argument(
        "--top-k", type=int, default=1, help="predictions to show (and explain, without --target)"
    )
    parser.add_argument(
        "--polarity",
        choices=sorted(POLARITIES),
        default="auto",
        help="invert dark-on-light pictures to match MNIST (auto: by the border)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser(
        "classify",
        help="print the top classes of an image",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.add_argument("image", type=Path, help="PNG or JPEG file")
    sub.set_defaults(run=classify)

    sub = commands.add_parser(
        "explain",
        help="classify an image and write its Grad-CAM overlay",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.add_argument("image", type=Path, help="PNG or JPEG file")
    sub.add_argument(
        "--out", type=Path, default=None, help="overlay PNG (default: <image>_gradcam.png)"
    )
    sub.add_argument(
        "--target",
        type=int,
        action="append",
        help="class to explain (repeatable; default: the top prediction(s))",
    )
    sub.add_argument(
        "--feature-maps",
        type=Path,
        default=None,
        help="also write the target layer's feature maps here",
    )
    sub.set_defaults(run=explain)

    sub = commands.add_parser(
        "explain-dir",
        help="explain every image under a directory, with a progress bar",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.add_argument(
        "directory", type=Path, help="directory searched recursively for PNG/JPEG files"
    )
    sub.add_argument(
        "--out-dir", type=Path, required=True, help="where overlays and predictions.csv go"
    )
    sub.add_argument(
        "--target", type=int, action="append", help="class to explain (default: the top prediction)"
    )
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=explain_dir)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with grpc.insecure_channel(args.url) as channel:
        stub = ex_grpc.ExplainerStub(channel)
        try:
            return int(args.run(stub, args))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
