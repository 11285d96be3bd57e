"""LND integration: gRPC connection and client wrappers."""
