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
from typing import Any

import grpc

from modelrepo import ALL_METHODS, DEFAULT_METHOD
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
    if args.method == "all":
        return explain_all_methods(stub, args)
    request = _request(args, args.image, predictions_only=False)
    request.method = args.method
    response = stub.Explain(request, timeout=args.timeout)
    _print_predictions(str(args.image), response)
    suffix = "gradcam" if args.method == DEFAULT_METHOD else args.method
    out = args.out or args.image.with_name(f"{args.image.stem}_{suffix}.png")
    for path, explanation in zip(
        _write_overlays(response, out), response.explanations, strict=True
    ):
        print(
            f"  {args.method} for class {explanation.target.label} ({response.target_layer}): "
            f"{path}"
        )
    if args.feature_maps:
        args.feature_maps.write_bytes(response.feature_maps_png)
        print(f"  feature maps of {response.target_layer}: {args.feature_maps}")
    return 0


def explain_all_methods(stub: ex_grpc.ExplainerStub, args: argparse.Namespace) -> int:
    """Every method the explainer offers for the top class, side by side in one picture."""
    import io

    from PIL import Image, ImageDraw

    tiles: list[tuple[str, Image.Image]] = []
    response = None
    for method in ALL_METHODS:
        request = _request(args, args.image, predictions_only=False)
        request.method = method
        try:
            response = stub.Explain(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "not offered" in (
                exc.details() or ""
            ):
                continue
            raise
        overlay = Image.open(io.BytesIO(response.explanations[0].overlay_png)).convert("RGB")
        tiles.append((method, overlay))
    if response is None:
        print(f"{args.image}: the explainer offers no method", file=sys.stderr)
        return 1
    _print_predictions(str(args.image), response)
    size = max(max(t.size) for _, t in tiles)
    caption = 14
    sheet = Image.new("RGB", (size * len(tiles), size + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (method, tile) in enumerate(tiles):
        sheet.paste(tile.resize((size, size)), (column * size, caption))
        draw.text((column * size + 2, 1), method, fill="black")
    out = args.out or args.image.with_name(f"{args.image.stem}_methods.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    label = response.explanations[0].target.label
    print(f"  {len(tiles)} methods for class {label}, side by side: {out}")
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


class _HelpFormatter(argparse.HelpFormatter):
    """Names each default once: the help text's own `default:` wins, else `(default: X)` is added.

    Nothing is added for a required option, a flag (default False) or a None default (its help
    says what happens instead); options repeated under a command (default SUPPRESS) state theirs
    in their help text.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _common_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """The options every command shares, accepted before the command and after it.

    Before the command they carry the defaults; after it they default to SUPPRESS, so a value
    given there overrides one given before, and an absent one leaves the earlier value alone.
    """
    where = "also accepted before the command" if after_command else "before or after the command"
    group = parser.add_argument_group(f"common options ({where})")
    url = os.environ.get("CNNSERVE_URL", "127.0.0.1:8001")
    options: list[tuple[str, dict[str, Any]]] = [
        (
            "--url",
            {
                "default": url,
                "metavar": "HOST:PORT",
                "help": f"server address (default: {url}; env CNNSERVE_URL)".replace("%", "%%"),
            },
        ),
        ("--model", {"default": "mnist_cnn", "metavar": "NAME", "help": "classifier name"}),
        (
            "--model-version",
            {"default": "", "metavar": "VERSION", "help": "model version (default: the latest)"},
        ),
        (
            "--top-k",
            {
                "type": int,
                "default": 1,
                "metavar": "K",
                "help": "predictions to show (and explain, without --target)",
            },
        ),
        (
            "--polarity",
            {
                "choices": sorted(POLARITIES),
                "default": "auto",
                "help": "invert dark-on-light pictures to match MNIST (auto: by the border)",
            },
        ),
        (
            "--timeout",
            {"type": float, "default": 30.0, "metavar": "SECONDS", "help": "seconds per request"},
        ),
    ]
    for flag, spec in options:
        if after_command:
            if "default" not in spec["help"]:
                spec["help"] += f" (default: {spec['default']})".replace("%", "%%")
            spec["default"] = argparse.SUPPRESS
        group.add_argument(flag, **spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Classify and explain images with a running cnnserve server.",
        epilog="The common options go before or after the command: "
        "`python -m client --top-k 3 explain x.png` and `python -m client explain x.png --top-k 3` "
        "are the same; `python -m client COMMAND --help` shows a command's own options.",
        formatter_class=_HelpFormatter,
    )
    _common_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )

    sub = command("classify", "print the top classes of an image")
    sub.add_argument("image", type=Path, help="PNG or JPEG file")
    _common_options(sub, after_command=True)
    sub.set_defaults(run=classify)

    sub = command("explain", "classify an image and write its Grad-CAM overlay")
    sub.add_argument("image", type=Path, help="PNG or JPEG file")
    sub.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PNG",
        help="overlay PNG; several targets add _<label> to its name (default: "
        "<image>_<method>.png)",
    )
    sub.add_argument(
        "--target",
        type=int,
        action="append",
        metavar="CLASS",
        help="class to explain (repeatable; default: the top prediction(s))",
    )
    sub.add_argument(
        "--feature-maps",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write a grid of the target layer's feature maps here (default: not written)",
    )
    sub.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=[*ALL_METHODS, "all"],
        help="explanation method; all: every method the explainer offers, side by side in one "
        "PNG, <image>_methods.png unless --out",
    )
    _common_options(sub, after_command=True)
    sub.set_defaults(run=explain)

    sub = command("explain-dir", "explain every image under a directory, with a progress bar")
    sub.add_argument(
        "directory", type=Path, help="directory searched recursively for PNG/JPEG files"
    )
    sub.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="where the overlays (mirroring the directory tree) and predictions.csv go",
    )
    sub.add_argument(
        "--target",
        type=int,
        action="append",
        metavar="CLASS",
        help="class to explain (repeatable; default: the top prediction)",
    )
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    _common_options(sub, after_command=True)
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
