"""The model repository's contract, shared by export/, service/ and tests/ (no torch here).

Layout (Triton's): <repo>/<model>/config.pbtxt, <repo>/<model>/labels.txt,
<repo>/<model>/<version>/model.onnx. A classifier `<model>` may have an explainer beside it,
`<model>_gradcam`, that takes the classifier's input plus a target class per item and returns
Grad-CAM maps. The names below are the only place these strings are spelled.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from pb import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"

EXPLAINER_SUFFIX = "_gradcam"

# Tensor names: a classifier takes INPUT and returns LOGITS and PROBABILITIES; its explainer takes
# INPUT and TARGET_CLASS (-1 = the predicted class) and returns CAM, CAM_RAW (the map at the
# target layer's resolution, before upsampling and normalisation), ACTIVATIONS (the target
# layer's feature maps), LOGITS, PROBABILITIES and EXPLAINED_CLASS.
INPUT = "input"
LOGITS = "logits"
PROBABILITIES = "probabilities"
TARGET_CLASS = "target_class"
CAM = "cam"
CAM_RAW = "cam_raw"
EXPLAINED_CLASS = "explained_class"
ACTIVATIONS = "activations"

# config.pbtxt parameters. NUM_CLASSES makes the inputs named in CLASS_INPUTS (default
# TARGET_CLASS) hold a class index in [-1, NUM_CLASSES); TARGET_LAYER and CLASSIFIER describe an
# explainer; EXECUTION_PROVIDER is added by the server to the config it reports.
NUM_CLASSES = "num_classes"
CLASS_INPUTS = "class_inputs"
TARGET_LAYER = "target_layer"
CLASSIFIER = "classifier"
EXECUTION_PROVIDER = "execution_provider"


def explainer_name(model: str) -> str:
    """The name of `model`'s Grad-CAM explainer in the repository."""
    return model + EXPLAINER_SUFFIX


# A version folder's name: ASCII digits only ("²".isdigit() is true and int("²") raises; "v2" and
# ".git" are not versions). Anything else in a model folder is ignored.
VERSION_FOLDER = re.compile(r"[0-9]+")


def version_folders(model_dir: Path) -> dict[int, Path]:
    """A model's version folders by number ({} when `model_dir` is not a folder)."""
    if not model_dir.is_dir():
        return {}
    return {
        int(p.name): p
        for p in model_dir.iterdir()
        if VERSION_FOLDER.fullmatch(p.name) is not None and p.is_dir()
    }


def read_config(model_dir: Path) -> mc.ModelConfig:
    """Parse a model's config.pbtxt (raises OSError or text_format.ParseError)."""
    return text_format.Parse((model_dir / CONFIG_FILE).read_text(), mc.ModelConfig())


def write_config(model_dir: Path, config: mc.ModelConfig) -> Path:
    """Write a model's config.pbtxt; returns its path."""
    path = model_dir / CONFIG_FILE
    path.write_text(text_format.MessageToString(config))
    return path


def write_labels(model_dir: Path, labels: list[str]) -> Path:
    """Write a model's class labels, one a line; returns the file's path."""
    path = model_dir / LABELS_FILE
    path.write_text("".join(f"{label}\n" for label in labels))
    return path


def read_labels(model_dir: Path) -> list[str]:
    """The class labels of a model, one a line ([] when the file is absent)."""
    path = model_dir / LABELS_FILE
    return path.read_text().splitlines() if path.is_file() else []


# Explanation methods beyond Grad-CAM. The explainer `<model>_gradcam` also returns GRADIENTS (the
# target class score's gradient at the target layer, beside ACTIVATIONS). Its version folder holds
# more graphs next to model.onnx, all reading one weights file (WEIGHTS_FILE, ONNX external data):
# SALIENCY_FILE (input, target_class -> INPUT_GRADIENT, logits, explained_class), FORWARD_FILE
# (input -> logits, probabilities: the classifier, for ScoreCAM's masked inputs), HEAD_FILE
# (INPUT, HEAD_INPUT: the target layer's activations -> logits, for AblationCAM), FEATURES_FILE
# (input -> activations, logits: the forward pass up to the target layer and the classifier's
# logits, without the backward pass, for the gradient-free CAMs), and one weight-free
# graph per method under METHODS_DIR (`<method>.onnx`, tensors below). METHODS, a config.pbtxt
# parameter of the explainer, lists the methods it offers (comma-separated); METHOD is the
# request parameter that picks one (default DEFAULT_METHOD); IG_STEPS the steps of Integrated
# Gradients (1..MAX_IG_STEPS, default DEFAULT_IG_STEPS).
GRADIENTS = "gradients"
INPUT_GRADIENT = "input_gradient"
HEAD_INPUT = "head_input"
WEIGHTS_FILE = "weights.data"
SALIENCY_FILE = "input_gradient.onnx"
FORWARD_FILE = "forward.onnx"
HEAD_FILE = "head.onnx"
FEATURES_FILE = "features.onnx"
METHODS_DIR = "methods"
METHODS = "methods"
METHOD = "method"
IG_STEPS = "ig_steps"
DEFAULT_METHOD = "gradcam"
# Every config.pbtxt parameter the repository itself writes (the server refuses other unknown
# keys, which would be misspelt ONNX Runtime options).
OWN_PARAMETERS = (NUM_CLASSES, CLASS_INPUTS, TARGET_LAYER, CLASSIFIER, EXECUTION_PROVIDER, METHODS)
DEFAULT_IG_STEPS = 50
MAX_IG_STEPS = 128
# Method graph tensors: a CAM method takes ACTIVATIONS [N, C, *S] and, as it needs them,
# GRADIENTS, EXPLAINED_CLASS [N], LOGITS [N, K] (the explainer's) and MASKED_LOGITS or
# ABLATED_LOGITS [N * C, K] (the logits of ScoreCAM's masked inputs, MASKS_FILE: ACTIVATIONS,
# INPUT -> MASKED [N * C, *input]; of AblationCAM's ablated activations, ABLATE_FILE:
# ACTIVATIONS, INPUT -> HEAD_INPUT [N * C, C, *S] and ABLATED_INPUT [N * C, *input], run
# through HEAD_FILE). Saliency takes INPUT_GRADIENT; Integrated Gradients takes INPUT,
# IG_STEPS [N] and INPUT_GRADIENT [N * steps, *input] of SCALED_FILE's SCALED inputs
# (INPUT, IG_STEPS -> SCALED [N * steps, *input]). Every method graph returns CAM_RAW (the map
# before upsampling and normalisation; the attribution itself for the input methods) and CAM
# ([N, *input spatial], in [0, 1]).
MASKED = "masked"
# EigenCAM and EigenGradCAM also return PROJECTION: the signed projection on the first principal
# component, [N, *S], before the ReLU (its sign fixed so its largest-magnitude entry is positive).
PROJECTION = "projection"
MASKED_LOGITS = "masked_logits"
ABLATED_INPUT = "ablated_input"
ABLATED_LOGITS = "ablated_logits"
SCALED = "scaled"
MASKS_FILE = "score_masks.onnx"
ABLATE_FILE = "ablate.onnx"
SCALED_FILE = "ig_scale.onnx"
GRADIENT_CAMS = (
    "gradcam",
    "hirescam",
    "gradcam_elementwise",
    "gradcam_plusplus",
    "xgradcam",
    "layercam",
    "eigengradcam",
)
ACTIVATION_CAMS = ("eigencam",)
FORWARD_CAMS = ("scorecam", "ablationcam")
GRADIENT_FREE_CAMS = ACTIVATION_CAMS + FORWARD_CAMS
INPUT_ATTRIBUTIONS = ("saliency", "integrated_gradients")
ALL_METHODS = GRADIENT_CAMS + ACTIVATION_CAMS + FORWARD_CAMS + INPUT_ATTRIBUTIONS
