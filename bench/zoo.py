"""Measure every model of the zoo and regenerate the zoo table (docs/zoo.md) and picture.

    .venv/bin/python -m bench.zoo   # after `make zoo`

Reads checkpoints/<model>.json (training metrics) and checkpoints/<model>.export.json (export
summary), measures FLOPs with PyTorch's FlopCounterMode and ONNX Runtime latency on this machine,
writes bench/results/zoo.json, the table between the zoo markers of docs/zoo.md, and docs/zoo_gradcam.png.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import ROOT, save_grid
from bench.reference_cli import latest_model
from modelrepo import CAM, INPUT, LOGITS, PROBABILITIES, TARGET_CLASS, explainer_name
from service.core.runtime import session_options
from training.cli import HelpFormatter

START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def ort_timings(path: Path, shape: tuple[int, ...], seconds: float = 2.0) -> tuple[float, float]:
    """(median ms at batch 1, images/s at batch 32) with one intra-op thread."""
    import onnxruntime as ort

    options = session_options(1)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    one = rng.random((1, *shape), dtype=np.float32)
    times = []
    session.run(None, {INPUT: one})
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run([LOGITS], {INPUT: one})
        times.append(time.perf_counter() - t)
    batch = rng.random((32, *shape), dtype=np.float32)
    session.run([LOGITS], {INPUT: batch})
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run([LOGITS], {INPUT: batch})
        calls += 1
    return 1000 * float(np.median(times)), 32 * calls / (time.perf_counter() - start)


def flops_per_image(model: Any, shape: tuple[int, ...]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


def gradcam_picture(repository: Path, names: list[str], out: Path) -> None:
    """The same real test digit explained by every 2-D model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnxruntime as ort

    from service.explain.imaging import overlay_png
    from training.mnist import load_mnist

    images, labels = load_mnist("test")
    picks = [0, 1, 2]  # the first three test digits: 7, 2, 1
    from training.models import MODELS

    flat = [n for n in names if len(MODELS[n].input_shape) == 3]
    fig, axes = plt.subplots(
        len(picks), len(flat) + 1, figsize=(1.6 * (len(flat) + 1), 1.8 * len(picks))
    )
    from PIL import Image

    for row, index in enumerate(picks):
        x = images[index].astype(np.float32)[None, None] / 255.0
        axes[row, 0].imshow(images[index], cmap="gray")
        axes[row, 0].set_title(f"digit {labels[index]}", fontsize=8)
        for col, name in enumerate(flat, start=1):
            session = ort.InferenceSession(
                str(latest_model(repository, explainer_name(name))),
                providers=["CPUExecutionProvider"],
            )
            cam, probs = session.run([CAM, PROBABILITIES], {INPUT: x, TARGET_CLASS: np.array([-1])})
            big = np.kron(images[index], np.ones((4, 4), dtype=np.uint8))
            axes[row, col].imshow(Image.open(io.BytesIO(overlay_png(big, cam[0]))))
            axes[row, col].set_title(
                f"{name}\n{probs[0].argmax()} ({100 * probs[0].max():.0f}%)", fontsize=7
            )
    title = "Grad-CAM of the predicted class, computed by ONNX Runtime from each explainer graph"
    save_grid(fig, title, out, dpi=120)


def clip_picture(repository: Path, out: Path) -> None:
    """cnn3d's spatio-temporal Grad-CAM: each frame of a real test clip with its slice of the map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnxruntime as ort
    from PIL import Image

    from service.explain.imaging import overlay_png
    from training.data import load_dataset

    clips, labels, _ = load_dataset("moving_mnist", "test")
    session = ort.InferenceSession(
        str(latest_model(repository, explainer_name("cnn3d"))), providers=["CPUExecutionProvider"]
    )
    picks = [0, 1]
    frames = clips.shape[1]
    fig, axes = plt.subplots(2 * len(picks), frames, figsize=(1.3 * frames, 2.8 * len(picks)))
    for row, index in enumerate(picks):
        clip = clips[index]
        x = clip.astype(np.float32)[None, None] / 255.0
        cam, probs = session.run([CAM, PROBABILITIES], {INPUT: x, TARGET_CLASS: [-1]})
        for t in range(frames):
            big = np.kron(clip[t], np.ones((4, 4), dtype=np.uint8))
            axes[2 * row, t].imshow(clip[t], cmap="gray")
            axes[2 * row + 1, t].imshow(Image.open(io.BytesIO(overlay_png(big, cam[0, t]))))
            axes[2 * row, t].set_title(f"frame {t}", fontsize=7)
        axes[2 * row, 0].set_title(f"digit {labels[index]}, frame 0", fontsize=7)
        axes[2 * row + 1, 0].set_title(
            f"Grad-CAM of {probs[0].argmax()} ({100 * probs[0].max():.0f}%)", fontsize=7, loc="left"
        )
    save_grid(fig, "cnn3d: Grad-CAM over time and space (one map for the whole clip)", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--readme", type=Path, default=ROOT / "docs" / "zoo.md")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "zoo_gradcam.png")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zoo.json")
    args = parser.parse_args()

    from training.checkpoint import load_checkpoint
    from training.models import MODELS

    rows = []
    for name, spec in MODELS.items():
        metrics_file = args.checkpoints / f"{name}.json"
        if not metrics_file.exists():
            print(f"skipping {name}: no {metrics_file} (train it with `make zoo`)")
            continue
        metrics = json.loads(metrics_file.read_text())
        export_file = args.checkpoints / f"{name}.export.json"
        exported = json.loads(export_file.read_text()) if export_file.exists() else {}
        ckpt = load_checkpoint(args.checkpoints / f"{name}.pt")
        onnx_path = latest_model(args.repository, name)
        ms1, tput32 = ort_timings(onnx_path, spec.input_shape)
        rows.append(
            {
                "model": name,
                "params": metrics["params"],
                "flops": flops_per_image(ckpt.model, spec.input_shape),
                "accuracy": metrics["test_accuracy"],
                "epochs": len(metrics["epochs"]),
                "dataset": spec.dataset,
                "onnx_mb": onnx_path.stat().st_size / 1e6,
                "ort_ms_batch1": ms1,
                "ort_images_per_s_batch32": tput32,
                "gradcam_max_abs_diff": exported.get("explainer", {}).get("max_abs_diff_cam_raw"),
                "train_minutes": metrics["train_seconds"] / 60,
            }
        )
        print(f"{name}: measured")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")

    lines = [
        "| model | params | MFLOPs/image | test accuracy | epochs | ONNX MB | ORT ms (batch 1) | ORT images/s (batch 32) | Grad-CAM max abs diff | training min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        diff = "n/a" if r["gradcam_max_abs_diff"] is None else f"{r['gradcam_max_abs_diff']:.1e}"
        task = "" if r["dataset"] == "mnist" else " (moving-digit clips)"
        lines.append(
            f"| `{r['model']}` | {r['params']:,} | {r['flops'] / 1e6:.1f} | {100 * r['accuracy']:.2f}%{task} | {r['epochs']} | "
            f"{r['onnx_mb']:.2f} | {r['ort_ms_batch1']:.2f} | {r['ort_images_per_s_batch32']:,.0f} | {diff} | {r['train_minutes']:.1f} |"
        )
    table = "\n".join(lines)
    text = args.readme.read_text()
    if START in text and END in text:
        text = re.sub(
            re.escape(START) + ".*?" + re.escape(END), f"{START}\n{table}\n{END}", text, flags=re.S
        )
        args.readme.write_text(text)
        print(f"updated the table in {args.readme}")
    print(table)
    gradcam_picture(args.repository, [r["model"] for r in rows], args.picture)
    print(f"wrote {args.picture}")
    if any(r["model"] == "cnn3d" for r in rows):
        clips_png = args.picture.with_name("cnn3d_gradcam.png")
        clip_picture(args.repository, clips_png)
        print(f"wrote {clips_png}")


if __name__ == "__main__":
    main()
