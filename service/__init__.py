"""cnnserve's model server: the Open Inference Protocol over gRPC on ONNX Runtime."""

__version__ = "0.1.0"
