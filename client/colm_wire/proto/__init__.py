"""Generated gRPC stubs of protos/colm/v1/selector.proto (run protos/generate.py)."""
