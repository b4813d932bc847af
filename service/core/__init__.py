"""The data plane: repository and model control, loading, the served model with its batcher and
ONNX Runtime sessions, statistics and the tensor signature. Numpy arrays and plain data in and out;
no protocol (neither grpc nor the wire messages) is imported here."""
