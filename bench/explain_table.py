"""The README's explanation-method table, from the results of bench/faithfulness.py and bench/sanity.py.

    .venv/bin/python -m bench.explain_table --models mnist_cnn,lenet5

Reads bench/results/faithfulness-<model>.json and sanity-<model>.json for each model and prints one
markdown table: per method its verification tolerance, the sanity correlation after every layer is
randomised, deletion / insertion AUC per model, and its cost (in-process at batch 32, served at 16
in flight, the reference library one image per call) for the first model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from export.gradcam.verify_methods import TOLERANCES
from service.explain.methods import title
from training.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results"
PAPERS = {
    "gradcam": "Selvaraju 2017",
    "hirescam": "Draelos 2020",
    "gradcam_plusplus": "Chattopadhay 2018",
    "xgradcam": "Fu 2020",
    "layercam": "Jiang 2021",
    "eigencam": "Muhammad 2020",
    "scorecam": "Wang 2020",
    "ablationcam": "Desai 2020",
    "saliency": "Simonyan 2014",
    "integrated_gradients": "Sundararajan 2017",
}

NEEDS = {
    "eigencam": "activations (a forward pass)",
    "scorecam": "activations, then a forward pass per channel",
    "ablationcam": "activations, then the head per channel",
    "saliency": "the input gradient",
    "integrated_gradients": "`ig_steps` input gradients (50)",
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(models: list[str]) -> str:
    """The markdown table for `models` (the first one's costs)."""
    faith = {m: _load(f"faithfulness-{m}.json") for m in models}
    sanity = {m: _load(f"sanity-{m}.json") for m in models}
    present = [m for m in models if faith[m]]
    if not present:
        raise SystemExit(f"no faithfulness results for {', '.join(models)} under {RESULTS}")
    first = faith[present[0]]
    assert first is not None
    rows = {row["method"]: row for row in first["rows"]}
    auc = " | ".join(f"deletion / insertion, {m}" for m in present)
    lines = [
        f"| method | needs | within | sanity, {present[0]} | {auc} | ms CPU/image, batch 32 | "
        "served, ms CPU/image (c=16) | reference, ms CPU/image |",
        "| --- | --- | --- | ---: | "
        + " | ".join("---" for _ in present)
        + " | ---: | ---: | ---: |",
    ]
    last = sanity[present[0]]
    correlation = last["rows"][-1]["correlation"] if last else {}
    for method, row in rows.items():
        name = title(method) if method != "random" else "a random map (the floor)"
        if method in PAPERS:
            name += f" ({PAPERS[method]})"
        cells = []
        for m in present:
            data = faith[m]
            assert data is not None
            got = next((r for r in data["rows"] if r["method"] == method), None)
            cells.append(
                f"{got['deletion_auc']:.2f} / {got['insertion_auc']:.2f}" if got else "not offered"
            )
        tolerance = (
            f"{TOLERANCES.get(method, 1e-4):.0e}".replace("e-0", "e-") if method != "random" else ""
        )
        corr = f"{correlation[method]:.2f}" if method in correlation else ""
        cost = "" if method == "random" else _ms(row.get("ms_per_image_batch32"))
        needs = "" if method == "random" else NEEDS.get(method, "activations, gradients")
        lines.append(
            f"| {name} | {needs} | {tolerance} | {corr} | {' | '.join(cells)} | {cost} | "
            f"{_ms(row.get('served_cpu_ms_per_image_c16'))} | "
            f"{_ms(row.get('reference_cpu_ms_per_image', row.get('reference_ms_per_image')))} |"
        )
    classifier = first.get("classifier_ms_per_image_batch32")
    if classifier is not None:
        lines.append("")
        lines.append(
            f"The classifier itself: {classifier:.2f} ms an image at batch 32 ({present[0]}, "
            f"{first['images']} test digits scored)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", default="mnist_cnn,lenet5", help="comma-separated models")
    args = parser.parse_args(argv)
    print(table([m for m in args.models.split(",") if m]))


if __name__ == "__main__":
    main()
