"""Generated protobuf and gRPC code of the gpt2.v1 API. Do not edit: run ``make proto``."""
