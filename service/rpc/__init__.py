"""The gRPC front: raw-bytes handlers, the servicers, and the protobuf codec. Every wire message
is read and built here; below it the core sees numpy arrays and plain data."""
