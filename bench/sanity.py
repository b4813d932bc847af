"""Sanity check of every explanation method (Adebayo et al. 2018, cascading randomisation).

    .venv/bin/python -m bench.sanity --checkpoint checkpoints/mnist_cnn.pt --images 64

The model's parameterised layers are re-initialised one at a time from the top (logits) down,
cumulatively; after each step the explainer folder is exported again and every method's map
(`cam`, at input resolution, from the ONNX graphs) is compared with the trained model's by
Spearman rank correlation, per image, averaged. A method that passes loses its correlation as
the layers it depends on are randomised; one that stays high explains the input, not the model.
Prints the table and writes bench/results/sanity-<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelrepo import CAM
from training.cli import HelpFormatter

Maps = dict[str, np.ndarray]


def layers_top_down(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, last (nearest the logits) first."""
    named = [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]
    return list(reversed(named))


def randomise(model: nn.Module, names: list[str], seed: int) -> nn.Module:
    """A copy of `model` with the named modules' parameters re-drawn (He normal, as at init)."""
    copy_ = copy.deepcopy(model)
    modules = dict(copy_.named_modules())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for parameter in modules[name].parameters(recurse=False):
                fan_in = parameter[0].numel() if parameter.dim() > 1 else parameter.numel()
                std = (2.0 / max(fan_in, 1)) ** 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return copy_.eval()


def rank_correlation(before: np.ndarray, after: np.ndarray) -> float:
    """Mean over images of Spearman's rho between two maps (ties ranked by their average)."""
    from scipy.stats import spearmanr

    values = []
    for a, b in zip(before.reshape(len(before), -1), after.reshape(len(after), -1), strict=True):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            values.append(0.0)  # a flat map carries no ranking
            continue
        values.append(float(spearmanr(a, b).statistic))
    return float(np.mean(values))


def cascading(
    model: nn.Module, maps: Callable[[nn.Module], Maps], seed: int = 0
) -> list[dict[str, object]]:
    """Rows of (layers randomised so far, each method's rank correlation with the original)."""
    original = maps(model)
    rows: list[dict[str, object]] = []
    done: list[str] = []
    for layer in layers_top_down(model):
        done.append(layer)
        current = maps(randomise(model, done, seed))
        rows.append(
            {
                "randomised_down_to": layer,
                "correlation": {m: rank_correlation(original[m], current[m]) for m in original},
            }
        )
    return rows


def onnx_maps(
    target_layer: str,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    classes: int,
    pixels: np.ndarray,
    targets: np.ndarray,
) -> Callable[[nn.Module], Maps]:
    """maps(model): export the explainer folder, run every method it offers from ONNX."""
    from export.gradcam.bundle import export_bundle
    from export.gradcam.run import MethodRunner
    from modelrepo import ALL_METHODS

    def maps(model: nn.Module) -> Maps:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            export_bundle(model, target_layer, input_shape, mean, std, classes, folder)
            runner = MethodRunner(folder)
            offered = set(runner.methods())
            return {m: runner.explain(m, pixels, targets)[CAM] for m in ALL_METHODS if m in offered}

    return maps


def eager_maps(
    target_layer: str,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    classes: int,
    pixels: np.ndarray,
    targets: np.ndarray,
) -> Callable[[nn.Module], Maps]:
    """maps(model): the method graphs from ONNX, the weight graphs' outputs from PyTorch eager.

    Exporting the explainer again after each randomisation takes minutes; the weight graphs
    (explainer, input gradient, forward, head) equal PyTorch eager within 1e-4 (the export's
    checks), so eager stands in for them here while every method's own arithmetic still runs
    from its ONNX graph.
    """
    import onnxruntime as ort

    from export.gradcam.methods import Shapes, method_graphs
    from export.gradcam.reference import gradcam_reference, input_gradient_reference
    from export.gradcam.references import Logits
    from export.gradcam.trace import _Head
    from modelrepo import (
        ACTIVATIONS,
        ALL_METHODS,
        EXPLAINED_CLASS,
        FEATURES_FILE,
        FORWARD_FILE,
        GRADIENTS,
        HEAD_FILE,
        HEAD_INPUT,
        INPUT,
        INPUT_GRADIENT,
        LOGITS,
        METHODS_DIR,
        MODEL_FILE,
        PROBABILITIES,
        SALIENCY_FILE,
        TARGET_CLASS,
    )
    from modelrepo.methods import explain_with_graphs

    def maps(model: nn.Module) -> Maps:
        x = torch.from_numpy(pixels)
        layer = gradcam_reference(model, target_layer, x[:1], torch.tensor([-1]), mean, std)
        shape = tuple(layer[ACTIVATIONS].shape[1:])
        shapes = Shapes(shape[0], shape[1:], input_shape, classes)
        sessions = {
            f"{METHODS_DIR}/{name}": ort.InferenceSession(
                graph.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            for name, graph in method_graphs(shapes).items()
        }

        def run(relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if relative in sessions:
                session = sessions[relative]
                wanted = {i.name for i in session.get_inputs()}
                names = [o.name for o in session.get_outputs()]
                got = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
                return dict(zip(names, got, strict=True))
            if relative == FEATURES_FILE:  # the explainer's forward pass: the reference below
                raise FileNotFoundError(relative)
            with torch.no_grad():
                if relative == FORWARD_FILE:
                    logits = Logits(model, mean, std)(torch.from_numpy(feeds[INPUT]))
                    return {LOGITS: logits.numpy(), PROBABILITIES: logits.softmax(1).numpy()}
                if relative == HEAD_FILE:
                    head = _Head(model, target_layer, mean, std)
                    inputs = torch.from_numpy(feeds[INPUT]), torch.from_numpy(feeds[HEAD_INPUT])
                    return {LOGITS: head(*inputs).numpy()}
            pixels_t = torch.from_numpy(feeds[INPUT])
            targets_t = torch.from_numpy(feeds[TARGET_CLASS])
            if relative == MODEL_FILE:
                ref = gradcam_reference(model, target_layer, pixels_t, targets_t, mean, std)
                keys = (ACTIVATIONS, GRADIENTS, LOGITS, EXPLAINED_CLASS)
            elif relative == SALIENCY_FILE:
                ref = input_gradient_reference(model, pixels_t, targets_t, mean, std)
                keys = (INPUT_GRADIENT, LOGITS, EXPLAINED_CLASS)
            else:
                raise KeyError(relative)
            return {k: ref[k].detach().numpy() for k in keys}

        offered = {Path(name).stem for name in sessions}
        return {
            m: explain_with_graphs(m, run, pixels, targets, 50)["cam"]
            for m in ALL_METHODS
            if m in offered
        }

    return maps


def print_table(rows: list[dict[str, object]]) -> None:
    methods = list(rows[0]["correlation"])  # type: ignore[call-overload]
    print("randomised down to   " + " ".join(f"{m[:11]:>11}" for m in methods))
    for row in rows:
        values = row["correlation"]
        assert isinstance(values, dict)
        print(
            f"{row['randomised_down_to']!s:<20} " + " ".join(f"{values[m]:>11.3f}" for m in methods)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint")
    parser.add_argument("--images", type=int, default=64, help="real test digits explained")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-drawn weights")
    parser.add_argument(
        "--engine",
        choices=["eager", "onnx"],
        default="eager",
        help="weight graphs from PyTorch eager (method graphs from ONNX) or every graph "
        "exported again after each randomisation (minutes a step)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: bench/results/)")
    args = parser.parse_args()

    from export.pipeline import explainer_targets, real_test_inputs
    from training.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    pixels, _ = real_test_inputs(ckpt, args.images)
    targets = explainer_targets(args.images, len(ckpt.labels))
    layer = ckpt.config.gradcam_layer
    started = time.perf_counter()
    build = eager_maps if args.engine == "eager" else onnx_maps
    maps = build(layer, ckpt.input_shape, ckpt.mean, ckpt.std, len(ckpt.labels), pixels, targets)
    rows = cascading(ckpt.model, maps, args.seed)
    print(f"{ckpt.name}: Spearman rank correlation of each method's map with the trained model's")
    print_table(rows)
    out = args.out or Path(__file__).resolve().parent / "results" / f"sanity-{ckpt.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": ckpt.name,
        "checkpoint": str(args.checkpoint),
        "target_layer": layer,
        "images": args.images,
        "engine": args.engine,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
