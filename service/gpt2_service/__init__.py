"""gpt2_service: a batched GPT-2 inference engine and the gRPC service around it."""

__version__ = "0.1.0"
