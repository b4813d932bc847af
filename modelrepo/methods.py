"""How an explainer folder's graphs chain into each method (torch-free; export/ and service/ alike).

`explain_with_graphs` is array plumbing only: every number comes from the graphs, run by the
caller's `run(relative_path, feeds) -> outputs` (ONNX Runtime in the export's checks and in the
server). Order: the explainer (or its outputs, given as `first`) or the input-gradient graph,
then the method's helper and weight graphs, then its weight-free method graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from modelrepo import (
    ABLATE_FILE,
    ABLATED_INPUT,
    ABLATED_LOGITS,
    ACTIVATIONS,
    ALL_METHODS,
    EXPLAINED_CLASS,
    FEATURES_FILE,
    FORWARD_FILE,
    GRADIENT_CAMS,
    GRADIENT_FREE_CAMS,
    GRADIENTS,
    HEAD_FILE,
    HEAD_INPUT,
    IG_STEPS,
    INPUT,
    INPUT_GRADIENT,
    LOGITS,
    MASKED,
    MASKED_LOGITS,
    MASKS_FILE,
    MAX_IG_STEPS,
    METHODS_DIR,
    MODEL_FILE,
    SALIENCY_FILE,
    SCALED,
    SCALED_FILE,
    TARGET_CLASS,
)

Run = Callable[[str, dict[str, np.ndarray]], Mapping[str, np.ndarray]]
# The most image variants (masked inputs, ablated activations, IG steps) in one graph run.
# A run's memory grows with it (Integrated Gradients keeps every variant's activations for the
# backward pass: ~0.5 MB an image for mnist_cnn, so 256 variants peak near 130 MB).
MAX_VARIANTS = 256
# Methods that need the explainer (forward and backward pass) to run first: the gradient CAMs.
NEEDS_EXPLAINER = GRADIENT_CAMS
# Methods that start from the explainer's outputs when they are at hand (activations, logits,
# explained_class); the gradient-free ones otherwise run FEATURES_FILE, a forward pass only.
TAKES_EXPLAINER_OUTPUTS = (*GRADIENT_CAMS, *GRADIENT_FREE_CAMS)


def method_file(method: str) -> str:
    """The method's weight-free graph, relative to the version folder."""
    return f"{METHODS_DIR}/{method}.onnx"


def parse_methods(text: str) -> tuple[str, ...]:
    """The methods listed in an explainer's METHODS config parameter (comma-separated)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def check_method(method: str, offered: tuple[str, ...], steps: int) -> None:
    """Raise ValueError for a method the explainer does not offer or steps out of range."""
    if method not in offered:
        known = ", ".join(offered) or "none"
        raise ValueError(f"method {method!r} is not offered by this explainer; it offers {known}")
    if method == "integrated_gradients" and not 1 <= steps <= MAX_IG_STEPS:
        raise ValueError(f"ig_steps must be in [1, {MAX_IG_STEPS}], got {steps}")


def explain_with_graphs(
    method: str,
    run: Run,
    pixels: np.ndarray,
    target_class: np.ndarray,
    steps: int,
    first: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The method's outputs (cam_raw, cam, ...) and explained_class for a batch.

    ScoreCAM, AblationCAM and Integrated Gradients run C (channels) or `steps` variants of each
    image: the batch is split so one graph run holds at most MAX_VARIANTS of them.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    variants = {"integrated_gradients": steps}.get(method, 1)
    if method in ("scorecam", "ablationcam") and first is not None:
        variants = int(np.asarray(first[ACTIVATIONS]).shape[1])
    elif method in ("scorecam", "ablationcam"):
        first = features(run, pixels, target_class)
        variants = int(np.asarray(first[ACTIVATIONS]).shape[1])
    per_run = max(1, MAX_VARIANTS // max(variants, 1))
    if len(pixels) <= per_run:
        return _explain(method, run, pixels, target_class, steps, first)
    parts = []
    for start in range(0, len(pixels), per_run):
        part = slice(start, start + per_run)
        sliced = {k: np.asarray(v)[part] for k, v in first.items()} if first else None
        parts.append(_explain(method, run, pixels[part], target_class[part], steps, sliced))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def features(run: Run, pixels: np.ndarray, target_class: np.ndarray) -> dict[str, np.ndarray]:
    """ACTIVATIONS, LOGITS and EXPLAINED_CLASS of a batch from a forward pass (FEATURES_FILE).

    The explained class is the target, or the top logit where the target is -1 (the explainer's
    rule, first index on ties as ONNX ArgMax). A folder exported before FEATURES_FILE existed
    runs the explainer instead (a backward pass more).
    """
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    targets = np.ascontiguousarray(target_class, dtype=np.int64).reshape(len(x))
    try:
        out = run(FEATURES_FILE, {INPUT: x})
    except FileNotFoundError:
        return dict(run(MODEL_FILE, {INPUT: x, TARGET_CLASS: targets}))
    logits = np.asarray(out[LOGITS])
    explained = np.where(targets >= 0, targets, np.argmax(logits, axis=1)).astype(np.int64)
    return {ACTIVATIONS: out[ACTIVATIONS], LOGITS: logits, EXPLAINED_CLASS: explained}


def _explain(
    method: str,
    run: Run,
    pixels: np.ndarray,
    target_class: np.ndarray,
    steps: int,
    first: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    targets = np.ascontiguousarray(target_class, dtype=np.int64).reshape(len(x))
    graph = method_file(method)
    if method in ("saliency", "integrated_gradients"):
        gradient = run(SALIENCY_FILE, {INPUT: x, TARGET_CLASS: targets})
        explained = np.asarray(gradient[EXPLAINED_CLASS]).reshape(len(x))
        if method == "saliency":
            out = run(graph, {INPUT_GRADIENT: gradient[INPUT_GRADIENT]})
        else:
            counts = np.full(len(x), steps, dtype=np.int64)
            scaled = run(f"{METHODS_DIR}/{SCALED_FILE}", {INPUT: x, IG_STEPS: counts})[SCALED]
            repeated = np.repeat(explained, steps)
            grads = run(SALIENCY_FILE, {INPUT: scaled, TARGET_CLASS: repeated})[INPUT_GRADIENT]
            out = run(graph, {INPUT: x, IG_STEPS: counts, INPUT_GRADIENT: grads})
        return {**out, EXPLAINED_CLASS: explained}
    if first is None and method in GRADIENT_FREE_CAMS:
        first = features(run, x, targets)
    elif first is None:
        first = run(MODEL_FILE, {INPUT: x, TARGET_CLASS: targets})
    explained = np.asarray(first[EXPLAINED_CLASS]).reshape(len(x))
    feeds = {name: first[name] for name in (ACTIVATIONS, GRADIENTS, LOGITS) if name in first}
    feeds.update({EXPLAINED_CLASS: explained, INPUT: x})
    if method == "scorecam":
        masked = run(f"{METHODS_DIR}/{MASKS_FILE}", feeds)[MASKED]
        feeds[MASKED_LOGITS] = np.asarray(run(FORWARD_FILE, {INPUT: masked})[LOGITS])
    elif method == "ablationcam":
        ablated = run(f"{METHODS_DIR}/{ABLATE_FILE}", feeds)
        head = {INPUT: ablated[ABLATED_INPUT], HEAD_INPUT: ablated[HEAD_INPUT]}
        feeds[ABLATED_LOGITS] = np.asarray(run(HEAD_FILE, head)[LOGITS])
    return {**run(graph, feeds), EXPLAINED_CLASS: explained}
