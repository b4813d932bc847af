"""Checkpoint -> verified ONNX (classifier and Grad-CAM explainer) -> model repository."""

import logging

# The exporter warns once per missing torchvision op; this project never uses torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
