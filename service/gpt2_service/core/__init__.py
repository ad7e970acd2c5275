"""The engine's core, in ids and counts: requests and their validation, sequences, KV-cache slots,
the scheduler and the detokenizer. No torch, no gRPC, no protobuf (checked by import-linter)."""
