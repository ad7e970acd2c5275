"""Turn a ``--model`` spec into a loaded GPT-2 and its tokenizer, without touching the network.

Specs:
- ``random:<size>`` (tiny, distilgpt2, gpt2, gpt2-medium, gpt2-large, gpt2-xl): GPT-2's
  architecture with seeded random weights and the real GPT-2 tokenizer. Says so loudly.
- a local checkpoint directory in Hugging Face format (config.json + model.safetensors or
  pytorch_model.bin, sharded or not, + tokenizer files).
- a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or owner/name) resolved from the
  local Hugging Face cache only; the hub itself is never contacted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2_service.errors import ModelLoadError
from gpt2_service.model.gpt2 import GPT2, GPT2Config
from gpt2_service.model.tokenizer import GPT2Tokenizer

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
DEFAULT_RANDOM_SEED = 0

RANDOM_SIZES: dict[str, GPT2Config] = {
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=2),
    "distilgpt2": GPT2Config(n_embd=768, n_layer=6, n_head=12),
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}

# Short hub ids and the organisations that now host them.
HUB_ALIASES: dict[str, tuple[str, ...]] = {
    "gpt2": ("openai-community/gpt2", "gpt2"),
    "gpt2-medium": ("openai-community/gpt2-medium", "gpt2-medium"),
    "gpt2-large": ("openai-community/gpt2-large", "gpt2-large"),
    "gpt2-xl": ("openai-community/gpt2-xl", "gpt2-xl"),
    "distilgpt2": ("distilbert/distilgpt2", "distilgpt2"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: GPT2
    tokenizer: GPT2Tokenizer
    name: str  # what the caller asked for, e.g. "gpt2" or "random:tiny"
    source: str  # where the weights came from: a path, or "random (seed 0)"
    random_weights: bool


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    allow_random_fallback: bool = False,
    seed: int = DEFAULT_RANDOM_SEED,
) -> LoadedModel:
    """Load ``spec``; if it cannot be had, fall back to random weights only when allowed."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if spec.startswith(RANDOM_PREFIX):
        loaded = _random_model(spec[len(RANDOM_PREFIX) :], seed)
    else:
        try:
            loaded = _load_checkpoint(spec)
        except ModelLoadError as exc:
            if not allow_random_fallback:
                raise
            size = spec if spec in RANDOM_SIZES else "gpt2"
            log.warning("%s", exc)
            log.warning(
                "FALLING BACK TO RANDOM WEIGHTS: serving random:%s instead of %r. "
                "Output will be gibberish. Pass --no-random-fallback to refuse to start instead.",
                size,
                spec,
            )
            loaded = _random_model(size, seed)
    loaded.model.to(device=device, dtype=DTYPES[dtype]).eval()
    if loaded.random_weights:
        log.warning(
            "MODEL HAS RANDOM WEIGHTS (%s): GPT-2 architecture, real tokenizer, untrained weights. "
            "Text will be meaningless; load a checkpoint with --model for real output.",
            loaded.name,
        )
    return loaded


def _random_model(size: str, seed: int) -> LoadedModel:
    if size not in RANDOM_SIZES:
        raise ModelLoadError(
            f"unknown random model size {size!r}; choose one of: " + ", ".join(RANDOM_PREFIX + s for s in RANDOM_SIZES)
        )
    model = GPT2(RANDOM_SIZES[size])
    model.init_random(seed)
    return LoadedModel(model, GPT2Tokenizer.embedded(), RANDOM_PREFIX + size, f"random (seed {seed})", True)


def _load_checkpoint(spec: str) -> LoadedModel:
    path = Path(spec).expanduser()
    if path.is_dir():
        directory = path
    elif "/" in spec and (spec.startswith((".", "/", "~")) or path.exists()):
        raise ModelLoadError(f"checkpoint directory {spec!r} does not exist")
    else:
        directory = _from_hf_cache(spec)
    model = GPT2(_read_config(directory))
    model.load_state_dict(_read_state_dict(directory), strict=True)
    tokenizer = GPT2Tokenizer.from_directory(directory)
    if tokenizer is None:
        log.warning("%s has no tokenizer files; using the embedded GPT-2 tokenizer", directory)
        tokenizer = GPT2Tokenizer.embedded()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelLoadError(
            f"tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    return LoadedModel(model, tokenizer, spec, str(directory), False)


def _from_hf_cache(repo: str) -> Path:
    """Find ``repo`` in the local Hugging Face cache. Never downloads, never waits on the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read the cache location now, not at import time, so HF_HUB_CACHE / HF_HOME set later count.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if "HF_HOME" in os.environ else None
    )
    for candidate in HUB_ALIASES.get(repo, (repo,)):
        try:
            return Path(snapshot_download(candidate, local_files_only=True, cache_dir=cache_dir))
        except (LocalEntryNotFoundError, ValueError, OSError):
            continue
    raise ModelLoadError(
        f"model {repo!r} is neither a local checkpoint directory nor in the local Hugging Face "
        "cache, and this service never downloads weights. Either copy a checkpoint directory "
        "(config.json + model.safetensors + tokenizer files) onto this machine and pass its path "
        "with --model, or fill the cache where the hub is reachable "
        f"(`huggingface-cli download {HUB_ALIASES.get(repo, (repo,))[0]}`) and mount it "
        "(HF_HOME), or run the random-weight model with --model random:gpt2."
    )


def _read_config(directory: Path) -> GPT2Config:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} has no config.json; it is not a Hugging Face checkpoint")
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ModelLoadError(f"{directory} holds a {model_type!r} model; only GPT-2 checkpoints are served")
    activation = raw.get("activation_function", "gelu_new")
    approximations = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    if activation not in approximations:
        raise ModelLoadError(f"unsupported activation_function {activation!r} in {config_path}")
    unsupported = [
        key
        for key, default in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("tie_word_embeddings", True),
        )
        if raw.get(key, default) != default
    ]
    if unsupported:
        raise ModelLoadError(f"{config_path} sets options this engine does not implement: {unsupported}")
    return GPT2Config(
        vocab_size=raw.get("vocab_size", 50257),
        n_positions=raw.get("n_positions", 1024),
        n_embd=raw.get("n_embd", 768),
        n_layer=raw.get("n_layer", 12),
        n_head=raw.get("n_head", 12),
        n_inner=raw.get("n_inner"),
        layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        activation=approximations[activation],
    )


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise ModelLoadError(f"{directory} has no model.safetensors or pytorch_model.bin")


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensors renamed to this model's parameter names (transformer.*)."""
    raw: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw.update(load_file(str(file)))
        else:
            raw.update(torch.load(file, map_location="cpu", weights_only=True))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied head; causal-mask buffers of older checkpoints
        state["transformer." + name] = tensor.float()
    return state
