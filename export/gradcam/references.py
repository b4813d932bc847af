"""The reference libraries, run on the same checkpoint: pytorch-grad-cam 1.5.7 and Captum 0.9.

Only the dev extra installs them (never the serving image). pytorch-grad-cam imports torchvision
at package import; every torchvision wheel reachable beside the CPU torch is a CUDA build whose
compiled part fails to load, and the classification CAMs use none of it, so `_stub_torchvision`
puts empty modules with the names it imports into `sys.modules` first (FIELD-NOTES, "Reference
libraries for explanations"). Each function returns the method's raw map the way the library
computes it, before its post-processing (pytorch-grad-cam's `scale_cam_image`: a min-max to
[0, 1] and a cv2 resize), by capturing what `compute_cam_per_layer` hands to that function.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

# pytorch-grad-cam's class for each method name of the repository (modelrepo.ALL_METHODS).
CAM_CLASSES = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcam_elementwise": "GradCAMElementWise",
    "gradcam_plusplus": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigengradcam": "EigenGradCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
CAPTUM_CLASSES = {"saliency": "Saliency", "integrated_gradients": "IntegratedGradients"}


def _stub_torchvision() -> None:
    """Empty torchvision modules with the names pytorch-grad-cam imports (none used by CAMs)."""
    if "torchvision" in sys.modules:
        return

    def unused(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError("torchvision is stubbed out for pytorch-grad-cam's CAMs")

    names = {
        "torchvision": {},
        "torchvision.transforms": {"Compose": unused, "Normalize": unused, "ToTensor": unused},
        "torchvision.transforms.functional": {"resize": unused},
        "torchvision.ops": {"box_iou": unused},
    }
    for name, attributes in names.items():
        module = types.ModuleType(name)
        for attribute, value in attributes.items():
            setattr(module, attribute, value)
        sys.modules[name] = module
    sys.modules["torchvision.transforms"].Resize = unused  # type: ignore[attr-defined]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms"].functional = sys.modules[  # type: ignore[attr-defined]
        "torchvision.transforms.functional"
    ]


def pytorch_grad_cam() -> types.ModuleType:
    """The pytorch_grad_cam package, imported with torchvision stubbed.

    The stubs leave `sys.modules` once it is imported (its modules keep what they took from
    them): torch.onnx's exporter looks torchvision up too, and a stub without a spec breaks it.
    """
    if "pytorch_grad_cam" in sys.modules:
        return sys.modules["pytorch_grad_cam"]
    stubbed = "torchvision" not in sys.modules
    _stub_torchvision()
    try:
        import pytorch_grad_cam as package
    finally:
        if stubbed:
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    return package


class Logits(nn.Module):
    """The classifier as the references see it: pixels in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.mean = mean
        self.std = std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def explained_classes(
    model: nn.Module, pixels: np.ndarray, targets: np.ndarray, mean: float, std: float
) -> np.ndarray:
    """-1 resolved to the predicted class."""
    with torch.no_grad():
        logits = Logits(model, mean, std).eval()(torch.from_numpy(pixels))
    return np.where(targets < 0, logits.argmax(1).numpy(), targets).astype(np.int64)


@contextmanager
def _captured() -> Iterator[dict[str, list[np.ndarray]]]:
    """What BaseCAM hands to scale_cam_image (the raw map, with a size) and, for the Eigen
    methods, what get_2d_projection returns (the signed projection); progress bars silenced."""
    from pytorch_grad_cam import ablation_cam, base_cam, eigen_cam, eigen_grad_cam, score_cam

    captured: dict[str, list[np.ndarray]] = {"cam_raw": [], "projection": []}
    scale: Callable[..., np.ndarray] = base_cam.scale_cam_image
    project: Callable[..., np.ndarray] = eigen_cam.get_2d_projection

    def capture_scale(cam: np.ndarray, target_size: Any = None) -> np.ndarray:
        if target_size is not None:
            captured["cam_raw"].append(np.array(cam, dtype=np.float32, copy=True))
        return scale(cam, target_size)

    def capture_projection(activations: np.ndarray) -> np.ndarray:
        result = project(activations)
        captured["projection"].append(np.array(result, dtype=np.float32, copy=True))
        return result

    quiet = types.SimpleNamespace(tqdm=lambda iterable, *_a, **_k: iterable)
    patches = [
        (base_cam, "scale_cam_image", capture_scale),
        (eigen_cam, "get_2d_projection", capture_projection),
        (eigen_grad_cam, "get_2d_projection", capture_projection),
        (score_cam, "tqdm", quiet),
        (ablation_cam, "tqdm", quiet),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield captured
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def cam_reference(
    method: str,
    model: nn.Module,
    target_layer: str,
    pixels: np.ndarray,
    explained: np.ndarray,
    mean: float,
    std: float,
) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's class for `method` on the model: raw map [N, *layer] and its output.

    `explained` holds each image's class (no -1). aug_smooth and eigen_smooth stay off; the raw
    map is `np.maximum(get_cam_image(...), 0)`, captured before `scale_cam_image`.
    """
    package = pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(package, CAM_CLASSES[method])
    module = dict(model.named_modules())[target_layer]
    wrapper = Logits(model, mean, std).eval()
    targets = [ClassifierOutputTarget(int(c)) for c in explained]
    with _captured() as captured, cls(model=wrapper, target_layers=[module]) as cam:
        final = cam(input_tensor=torch.from_numpy(np.ascontiguousarray(pixels)), targets=targets)
    model.eval()
    for p in model.parameters():
        p.grad = None
    result = {"cam_raw": captured["cam_raw"][0], "cam": np.asarray(final)}
    if captured["projection"]:
        result["projection"] = captured["projection"][0]
    return result


def captum_reference(
    method: str,
    model: nn.Module,
    pixels: np.ndarray,
    explained: np.ndarray,
    mean: float,
    std: float,
    steps: int = 50,
) -> np.ndarray:
    """Captum's Saliency (abs) or IntegratedGradients (gausslegendre, zero baseline): [N, *in]."""
    import captum.attr

    wrapper = Logits(model, mean, std).eval()
    inputs = torch.from_numpy(np.ascontiguousarray(pixels)).requires_grad_()
    target = torch.from_numpy(explained)
    if method == "saliency":
        attribution = captum.attr.Saliency(wrapper).attribute(inputs, target=target, abs=True)
    elif method == "integrated_gradients":
        attribution = captum.attr.IntegratedGradients(wrapper).attribute(
            inputs, target=target, n_steps=steps, method="gausslegendre"
        )
    else:
        raise ValueError(f"not a Captum method here: {method!r}")
    return attribution.detach().numpy()
