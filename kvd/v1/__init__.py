"""The kvd.v1 API: generated protobuf/gRPC stubs (``make proto``) of proto/kvd/v1."""
