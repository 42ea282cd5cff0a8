"""The selector service: a thin gRPC shell around the selection engine."""
