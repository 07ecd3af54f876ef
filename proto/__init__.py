"""The wire contract (edgefleet.proto) and its generated gRPC code."""
