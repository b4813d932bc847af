"""cnnserve's model server: the Open Inference Protocol over gRPC on ONNX Runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnserve")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
