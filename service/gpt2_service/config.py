"""Engine configuration: a frozen dataclass whose fields all have defaults and a description.

The server's flags (and their GPT2_SERVE_* environment twins) are generated from the field
metadata, so ``--help`` and this file cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def _opt(default: T, help: str) -> T:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: str = _opt("random:gpt2", "model: random:<size>, a checkpoint directory, or a hub id in the local HF cache")
    random_fallback: bool = _opt(
        True, "serve random weights (loudly) when --model cannot be loaded, instead of exiting"
    )
    dtype: str = _opt("float32", "weights and KV-cache dtype: float32, bfloat16 or float16")
    device: str = _opt("cpu", "torch device, e.g. cpu or cuda")
    max_batch_size: int = _opt(32, "most sequences decoded together in one step")
    max_queue_size: int = _opt(256, "most requests waiting for a batch slot; beyond it requests are rejected")
    kv_cache_slots: int = _opt(0, "KV-cache slots (one per running sequence); 0 = max_batch_size")
    context_window: int = _opt(0, "positions per sequence; 0 = the model's n_positions (1024 for GPT-2)")
    max_prefill_tokens: int = _opt(256, "prompt tokens prefilled per engine step (bounds the stall of running streams)")
    context_shift_keep: int = _opt(
        0, "tokens kept when a generation shifts its window; 0 = three quarters of the window"
    )
    max_new_tokens_limit: int = _opt(2048, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = _opt(64, "max_new_tokens of a request that does not set it")
    num_threads: int = _opt(0, "torch intra-op threads of the engine thread; 0 = torch's default (the cores)")
    batch_invariant: bool = _opt(
        False,
        "bitwise the same results for a request whatever shares its batch (CPU float32 only; "
        "costs speed, see the README)",
    )
    stage_timing: bool = _opt(True, "time embedding/attention/mlp/lm_head/sampling per step (CPU only)")
    seed: int = _opt(0, "seed of the random weights of random:<size> models")

    def resolved_slots(self) -> int:
        return self.kv_cache_slots or self.max_batch_size
