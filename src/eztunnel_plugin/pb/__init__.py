"""Generated protobuf and gRPC modules (built by `make build`, never edited)."""
