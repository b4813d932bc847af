"""Grad-CAM's math and its eager PyTorch autograd reference, the truth the ONNX graph is held to.

Grad-CAM (Selvaraju et al. 2017): the channel weights are the spatial mean of the gradient of the
pre-softmax class score with respect to a target layer's activations; the map is the ReLU of the
activations weighted by them, then upsampled to the input and min-max normalised. Nothing here
knows an architecture: a forward hook splits the model at the named module. The tracer
(`export.gradcam.trace`) runs the same `gradcam_core` under `make_fx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelrepo import (
    ACTIVATIONS,
    CAM,
    CAM_RAW,
    EXPLAINED_CLASS,
    GRADIENTS,
    INPUT_GRADIENT,
    LOGITS,
    PROBABILITIES,
)

# Floor of the min-max normaliser, so an all-zero map divides by it, not by zero. Not `+ eps`:
# the ONNX optimiser folds a tiny added constant away.
NORM_EPS = 1e-6
# A map whose spread is below this fraction of its peak is flat (an all-black image gives a
# constant map): it normalises to zero. Stretching it would show only float rounding, which
# differs between PyTorch and ONNX Runtime (~1e-10 on a constant mnist_cnn map, x1e6 by NORM_EPS).
FLAT_RELATIVE = 1e-4


class TargetLayerError(ValueError):
    """The Grad-CAM target layer is missing, never called, called twice or not a feature map."""


@dataclass
class _Capture:
    """The grad-requiring leaf that stands in for the target layer's output."""

    name: str
    leaf: torch.Tensor | None = None
    calls: int = 0


def _find_module(model: nn.Module, target_layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if target_layer not in modules or not target_layer:
        names = [name for name in modules if name]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise TargetLayerError(f"no module named {target_layer!r} in the model; modules: {shown}")
    return modules[target_layer]


@contextmanager
def _split_at(model: nn.Module, target_layer: str) -> Iterator[_Capture]:
    """Replace the target module's output with a clone of a detached, grad-requiring leaf.

    The clone keeps the leaf intact when a later op works in place on the output
    (`out += identity`, `ReLU(inplace=True)`); the rest of the model runs unchanged.
    """
    module = _find_module(model, target_layer)
    capture = _Capture(target_layer)

    def hook(_module: nn.Module, _args: Any, output: Any) -> torch.Tensor:
        capture.calls += 1
        if capture.calls > 1:
            raise TargetLayerError(
                f"target layer {target_layer!r} is called more than once in a forward pass "
                "(a shared module?); Grad-CAM needs a module that runs exactly once: "
                "name another layer"
            )
        if not isinstance(output, torch.Tensor) or output.dim() < 3:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise TargetLayerError(
                f"target layer {target_layer!r} must output a feature map [N, C, *spatial], "
                f"got {shape}"
            )
        capture.leaf = output.detach().requires_grad_()
        return capture.leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad (only the activation's gradient is wanted), then restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradcam_core(
    model: nn.Module,
    target_layer: str,
    mean: float,
    std: float,
    pixels: torch.Tensor,
    target_class: torch.Tensor,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cam_raw, activations, gradients, logits, explained_class) for raw pixels in [0, 1].

    `validate` checks the targets against the number of classes (eagerly; not while tracing).
    """
    with _split_at(model, target_layer) as capture, torch.enable_grad():
        logits = model((pixels - mean) / std)
    if capture.leaf is None:
        raise TargetLayerError(
            f"target layer {target_layer!r} is never called in the forward pass; "
            "name a module that runs exactly once"
        )
    activations = capture.leaf
    if validate:
        _check_targets(target_class, logits.shape[1])
    explained = torch.where(target_class < 0, logits.argmax(dim=1), target_class)
    # Samples are independent in eval mode, so one backward of the summed scores serves the batch.
    score = logits.gather(1, explained.unsqueeze(1)).sum()
    (grads,) = torch.autograd.grad(score, activations)
    spatial = tuple(range(2, activations.dim()))
    weights = grads.mean(dim=spatial, keepdim=True)
    cam_raw = torch.relu((weights * activations).sum(dim=1))
    return cam_raw, activations.detach(), grads, logits.detach(), explained


def input_gradient_core(
    model: nn.Module,
    mean: float,
    std: float,
    pixels: torch.Tensor,
    target_class: torch.Tensor,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_gradient, logits, explained_class): the target score's gradient at the raw pixels.

    The gradient is taken with respect to the pixels in [0, 1] (normalisation inside), as Captum
    sees a classifier that takes them.
    """
    leaf = pixels.detach().requires_grad_()
    with torch.enable_grad():
        logits = model((leaf - mean) / std)
    if validate:
        _check_targets(target_class, logits.shape[1])
    explained = torch.where(target_class < 0, logits.argmax(dim=1), target_class)
    score = logits.gather(1, explained.unsqueeze(1)).sum()
    (grads,) = torch.autograd.grad(score, leaf)
    return grads, logits.detach(), explained


def cam_from_raw(cam_raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Upsample (bi/trilinear) to the input's spatial size, then min-max normalise per image.

    All-zero and flat maps (spread <= FLAT_RELATIVE x peak) become all zero, never NaN.
    """
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    cam = F.interpolate(cam_raw.unsqueeze(1), size=size, mode=mode, align_corners=False)
    cam = cam.squeeze(1)
    shape = (-1,) + (1,) * len(size)
    low = cam.flatten(1).amin(dim=1).view(shape)
    high = cam.flatten(1).amax(dim=1).view(shape)
    spread = high - low
    scaled = (cam - low) / spread.clamp_min(NORM_EPS)
    return torch.where(spread > FLAT_RELATIVE * high.abs(), scaled, torch.zeros_like(cam))


def _check_targets(target_class: torch.Tensor, num_classes: int) -> None:
    bad = (target_class < -1) | (target_class >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target_class must be -1 (the predicted class) or in [0, {num_classes}), "
            f"got {target_class[bad].tolist()}"
        )


def gradcam_reference(
    model: nn.Module,
    target_layer: str,
    pixels: torch.Tensor,
    target_class: torch.Tensor,
    mean: float,
    std: float,
) -> dict[str, torch.Tensor]:
    """Grad-CAM with PyTorch autograd, eagerly: the reference the ONNX graph is checked against.

    `pixels` is [N, *input_shape] in [0, 1]; `target_class` [N] (-1 = the predicted class).
    Returns cam_raw, cam, activations, logits, probabilities and explained_class.
    """
    model.eval()
    pixels = pixels.detach().float()
    target_class = target_class.detach().long()
    with frozen(model):
        cam_raw, activations, grads, logits, explained = gradcam_core(
            model, target_layer, mean, std, pixels, target_class, validate=True
        )
    cam = cam_from_raw(cam_raw.detach(), tuple(pixels.shape[2:]))
    return {
        CAM: cam,
        CAM_RAW: cam_raw.detach(),
        ACTIVATIONS: activations,
        GRADIENTS: grads.detach(),
        LOGITS: logits,
        PROBABILITIES: logits.softmax(dim=1),
        EXPLAINED_CLASS: explained,
    }


def input_gradient_reference(
    model: nn.Module, pixels: torch.Tensor, target_class: torch.Tensor, mean: float, std: float
) -> dict[str, torch.Tensor]:
    """The input gradient with PyTorch autograd, eagerly: input_gradient, logits, explained_class."""
    model.eval()
    with frozen(model):
        grads, logits, explained = input_gradient_core(
            model, mean, std, pixels.detach().float(), target_class.detach().long(), validate=True
        )
    return {INPUT_GRADIENT: grads, LOGITS: logits, EXPLAINED_CLASS: explained}
