"""GPT-2 itself: the module (reading like the paper), its kernels, its KV-cache, its weights and its
tokenizer. Torch, but no scheduling and no gRPC."""
