"""gpt2_client: the Python client of the gpt2.v1 gRPC service (imports without torch)."""

__version__ = "0.1.0"
