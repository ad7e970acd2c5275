"""Keyword arguments -> GenerateRequest: unset stays unset (server defaults), bad names fail early."""

from __future__ import annotations

import pytest
from gpt2_client.params import build_batch, build_request
from gpt2_client.proto import generation_pb2 as pb


def test_unset_parameters_stay_unset_so_the_server_default_applies() -> None:
    request = build_request("Hello", {"temperature": None, "max_new_tokens": 5})
    assert request.prompt == "Hello"
    assert not request.sampling.HasField("temperature") and not request.sampling.HasField("seed")
    assert request.stopping.HasField("max_new_tokens") and request.stopping.max_new_tokens == 5


def test_zero_is_sent_as_zero_not_as_unset() -> None:
    request = build_request("Hello", {"temperature": 0.0, "seed": 0})
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert request.sampling.HasField("seed") and request.sampling.seed == 0


def test_token_ids_stop_strings_and_enums() -> None:
    request = build_request(
        [464, 3797], {"stop": "\n", "stop_token_ids": [13], "truncation": "reject", "overflow": "stop"}
    )
    assert request.WhichOneof("input") == "prompt_token_ids" and list(request.prompt_token_ids.ids) == [464, 3797]
    assert list(request.stopping.stop) == ["\n"] and list(request.stopping.stop_token_ids) == [13]
    assert (request.truncation, request.overflow) == (pb.REJECT, pb.STOP)


def test_bad_names_and_choices_fail_before_sending() -> None:
    with pytest.raises(TypeError, match="top_q"):
        build_request("x", {"top_q": 0.5})
    with pytest.raises(ValueError, match="truncation"):
        build_request("x", {"truncation": "middle"})


def test_batch_items_override_shared_parameters() -> None:
    batch = build_batch(["a", {"prompt": "b", "seed": 2, "max_new_tokens": 3}], {"seed": 1, "max_new_tokens": 7})
    assert [(r.prompt, r.sampling.seed, r.stopping.max_new_tokens) for r in batch.requests] == [
        ("a", 1, 7),
        ("b", 2, 3),
    ]
