"""The edge daemon: gRPC service, shard store, stage execution (torch), quantized kernels."""
