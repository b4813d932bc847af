"""`python -m client`: classify an image, explain it, or explain a whole directory.

python -m client classify digit.png
python -m client explain digit.png --out overlay.png --top-k 3 --feature-maps maps.png
python -m client explain digit.png --method integrated_gradients --ig-steps 16
python -m client explain-dir photos/ --out-dir overlays/
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from modelrepo import ALL_METHODS, DEFAULT_IG_STEPS, DEFAULT_METHOD, MAX_IG_STEPS
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
POLARITIES = {"auto": ex.POLARITY_AUTO, "as-is": ex.POLARITY_AS_IS, "invert": ex.POLARITY_INVERT}
SCALES = {"per-class": ex.HEATMAP_SCALE_PER_CLASS, "shared": ex.HEATMAP_SCALE_SHARED}


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
        request.annotated = True
        request.heatmap_scale = SCALES[args.scale]
        request.ig_steps = getattr(args, "ig_steps", None) or 0
    return request


def _ig_steps(text: str) -> int:
    """An --ig-steps value: a whole number of steps (the server holds it to its bound)."""
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a whole number of steps, 1 to {MAX_IG_STEPS} (default {DEFAULT_IG_STEPS})"
        )
    return steps


def _print_predictions(name: str, response: ex.ExplainResponse) -> None:
    ranked = ", ".join(f"{p.label} ({100 * p.probability:.1f}%)" for p in response.predictions)
    print(f"{name}: {ranked}")
    if response.inverted:
        print("  (inverted: a dark picture on light paper, as the model reads light on dark)")
    for warning in response.warnings:
        print(f"  warning: {warning}")


OVERLAY_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _overlay_path(text: str) -> Path:
    """An --out path whose suffix names a picture format the client writes."""
    path = Path(text)
    if path.suffix.lower() not in OVERLAY_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name a .png, .jpg or .jpeg file (the suffix picks the format)"
        )
    return path


def _encoded(png: bytes, path: Path) -> bytes:
    """The server's PNG as the format `path`'s suffix names (PNG as is, JPEG re-encoded)."""
    fmt = OVERLAY_FORMATS.get(path.suffix.lower(), "PNG")
    if fmt == "PNG":
        return png
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(io.BytesIO(png)) as img:
        img.convert("RGB").save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


def _write_overlays(response: ex.ExplainResponse, out: Path) -> list[Path]:
    """One picture per explanation (annotated where the server sent it): `out` itself for a
    single one, `<stem>_<label><suffix>` for several (e.g. overlay_7.png, overlay_2.png)."""
    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for explanation in response.explanations:
        path = out
        if len(response.explanations) > 1:
            path = out.with_name(f"{out.stem}_{explanation.target.label}{out.suffix}")
        picture = explanation.annotated_png or explanation.overlay_png
        path.write_bytes(_encoded(picture, path))
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
    named = args.method + (f" ({response.ig_steps} steps)" if response.ig_steps else "")
    for path, explanation in zip(
        _write_overlays(response, out), response.explanations, strict=True
    ):
        print(f"  {named} for class {explanation.target.label} ({response.target_layer}): {path}")
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


def _images(directory: Path, skip: Path | None = None) -> list[Path]:
    """The pictures under `directory`, recursively, leaving out those under `skip`."""
    found = []
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
    return found


def _progress(items: Sequence[Path], quiet: bool) -> Iterable[Path]:
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        return items
    return tqdm(items, unit="image", disable=quiet)


CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("image", "rank", "class_index", "label", "probability", "overlay", "error")


class UsageError(Exception):
    """A command given something it cannot work with; the message says what to do."""


def _overlay_name(relative: Path) -> Path:
    """`a.png` -> `a_png.png`, `a.jpg` -> `a_jpg.png`: pictures differing only in their suffix
    get overlays of their own."""
    return relative.with_name(f"{relative.stem}_{relative.suffix.lstrip('.')}.png")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding files, unless --overwrite and it holds an earlier run's output,
    which is then removed (the files its predictions.csv lists, and the CSV)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir}: is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    listing = out_dir / CSV_NAME
    if not overwrite:
        raise UsageError(
            f"--out-dir {out_dir}: not empty; pass --overwrite to replace an earlier run's "
            "output there, or name a new folder"
        )
    if not listing.is_file():
        raise UsageError(
            f"--out-dir {out_dir}: not empty and holds no {CSV_NAME}, so it is not an earlier "
            "run's output; --overwrite only replaces those: name a new or empty folder"
        )
    with listing.open(newline="") as handle:
        for row in csv.DictReader(handle):
            overlay = row.get("overlay") or ""
            path = (out_dir / overlay).resolve()
            if overlay and path.is_relative_to(out_dir.resolve()) and path.is_file():
                path.unlink()
    listing.unlink()


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        raise UsageError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise UsageError(
            f"{directory}: is a file; explain-dir takes a folder (`explain {directory}` "
            "explains one picture)"
        )


def explain_dir(stub: ex_grpc.ExplainerStub, args: argparse.Namespace) -> int:
    _check_directory(args.directory)
    out_dir: Path = args.out_dir
    images = _images(args.directory, skip=out_dir.resolve())
    if not images:
        raise UsageError(
            f"{args.directory}: no PNG or JPEG files in this folder or below it "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    _prepare_out_dir(out_dir, args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    rows: list[dict[str, Any]] = []
    for image in _progress(images, args.quiet):
        relative = image.relative_to(args.directory)
        try:
            response = stub.Explain(_request(args, image, False), timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise
            failures += 1
            error = f"{exc.code().name}: {exc.details()}"
            print(f"\n{relative}: {error}", file=sys.stderr)
            rows.append({"image": relative.as_posix(), "error": error})
            continue
        except OSError as exc:
            failures += 1
            rows.append({"image": relative.as_posix(), "error": f"{exc.__class__.__name__}: {exc}"})
            continue
        paths = _write_overlays(response, out_dir / _overlay_name(relative))
        ranks = {p.class_index: rank for rank, p in enumerate(response.predictions, 1)}
        for explanation, path in zip(response.explanations, paths, strict=True):
            target = explanation.target
            rows.append(
                {
                    "image": relative.as_posix(),
                    "rank": ranks.get(target.class_index, ""),
                    "class_index": target.class_index,
                    "label": target.label,
                    "probability": f"{target.probability:.4f}",
                    "overlay": path.relative_to(out_dir).as_posix(),
                }
            )
    with (out_dir / CSV_NAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    failed = f"; {failures} failed (their rows give the error)" if failures else ""
    print(
        f"explained {len(images) - failures} of {len(images)} images into {out_dir}{failed} "
        f"({CSV_NAME} lists them: one row per overlay)"
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


def _scale_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="per-class",
        help="overlay colours: each class from its own min to max, or one scale shared by the "
        "classes of a picture so they compare (each overlay says which)",
    )


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
        type=_overlay_path,
        default=None,
        metavar="FILE",
        help="overlay picture, .png or .jpg (the suffix picks the format); with several classes "
        "each gets _<label> before the suffix, e.g. overlay_7.png (default: <image>_<method>.png)",
    )
    sub.add_argument(
        "--target",
        type=int,
        action="append",
        metavar="CLASS",
        help="class to explain (repeatable; default: the top prediction(s))",
    )
    _scale_option(sub)
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
    sub.add_argument(
        "--ig-steps",
        type=_ig_steps,
        default=None,
        metavar="N",
        help=f"Integrated Gradients' steps, 1 to {MAX_IG_STEPS} (default: the server's, "
        f"{DEFAULT_IG_STEPS}); more steps, a closer integral and a slower answer",
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
        help="where the overlays (mirroring the directory tree; a.jpg -> a_jpg.png) and "
        "predictions.csv go; it must be new or empty unless --overwrite",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's output in --out-dir (the files its predictions.csv lists)",
    )
    sub.add_argument(
        "--target",
        type=int,
        action="append",
        metavar="CLASS",
        help="class to explain (repeatable; default: the top prediction)",
    )
    _scale_option(sub)
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    _common_options(sub, after_command=True)
    sub.set_defaults(run=explain_dir)
    return parser


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):(\d{1,5})$")


def server_address(url: str) -> str:
    """--url as gRPC's HOST:PORT: `http://HOST:PORT` (plaintext, as this client speaks) is taken
    without its scheme; anything else but HOST:PORT is refused with the expected form."""
    address = url.strip()
    if address.lower().startswith("http://"):
        address = address[len("http://") :].rstrip("/")
    elif "://" in address:
        raise UsageError(
            f"--url {url!r}: this client speaks plaintext gRPC; give HOST:PORT "
            "(e.g. 127.0.0.1:8001) or http://HOST:PORT"
        )
    if not _HOST_PORT.match(address):
        raise UsageError(f"--url {url!r}: expected HOST:PORT, e.g. 127.0.0.1:8001")
    return address


def _unreachable(url: str, exc: grpc.RpcError) -> str:
    return (
        f"error: no server answers at {url} ({exc.code().name}: {exc.details()}).\n"
        "Start one (`make serve`, or `python -m service --model-repository DIR`), or point "
        "--url or CNNSERVE_URL at a running one."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        address = server_address(args.url)
    except UsageError as exc:
        parser.error(str(exc))
    with grpc.insecure_channel(address) as channel:
        stub = ex_grpc.ExplainerStub(channel)
        try:
            return int(args.run(stub, args))
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                print(_unreachable(address, exc), file=sys.stderr)
            else:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
