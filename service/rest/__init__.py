"""The HTTP front: the KServe v2 REST protocol (with Triton's binary tensor data and
classification extensions) over the same core objects as the gRPC front, served by uvicorn on the
server's own event loop."""
