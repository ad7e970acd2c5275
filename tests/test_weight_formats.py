"""``gpt2-serve --weights`` end to end: the flag and its environment twin choose the format, the
server reports it (ModelInfo, the info metric) with batch invariance, and generates with it; a
format the device cannot run is refused at start-up."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from gpt2_client.proto import common_pb2, generation_pb2_grpc, introspection_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import introspection_pb2 as ipb
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, serve
from tests.process_helpers import serve_process


def _generate(channel: object, n: int) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt_token_ids=common_pb2.TokenIds(ids=[464, 3797, 3332, 319, 262]))
    request.sampling.temperature = 0.9
    request.sampling.seed = 7
    request.stopping.max_new_tokens = n
    request.stopping.ignore_eos = True
    response: pb.GenerateResponse = generation_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=30)
    return response


@pytest.mark.parametrize(("flags", "env", "weights", "invariant"), [
    (("--weights", "int8"), {}, "int8", True),
    ((), {"GPT2_SERVE_WEIGHTS": "float16", "GPT2_SERVE_BATCH_INVARIANT": "false"}, "float16", False),
])  # fmt: skip
def test_the_served_weight_format_is_the_one_asked_for_and_reported(
    flags: tuple[str, ...], env: dict[str, str], weights: str, invariant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with serve_process(*flags) as server:
        stub = generation_pb2_grpc.TextGenerationStub(server.channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        first, again = _generate(server.channel, 6), _generate(server.channel, 6)
        [labels] = [dict(labels) for name, labels in server.samples() if name == "gpt2_model_info"]
        assert server.stop() == 0
    assert (info.weights, info.batch_invariant) == (weights, invariant)
    assert (labels["weights"], labels["batch_invariant"]) == (weights, str(invariant).lower())
    assert len(first.token_ids) == 6 and list(first.token_ids) == list(again.token_ids)  # seeded
    assert f'"weights": "{weights}"' in server.log() or f"weights={weights}" in server.log()


def test_a_format_the_device_cannot_run_is_refused_at_start_up() -> None:
    command = [sys.executable, "-m", "gpt2_service", "--model", "random:tiny", "--port", "0", "--metrics-port", "-1",
               "--dtype", "bfloat16", "--weights", "int8"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 1
    assert "--weights int8 needs float32 arithmetic on the CPU" in done.stderr
    assert "Traceback" not in done.stderr


async def test_introspection_computes_with_the_served_weight_format(tiny: LoadedModel) -> None:
    """Introspection shows the model the server runs: with int8 weights its LM head gives the
    log-probability that generation reports for the same token, not float32's."""
    config = dataclasses.replace(API_ENGINE_CONFIG, weights="int8")
    async with serve(tiny, engine_config=config) as served, served.channel() as channel:
        prompt = "The cat sat on the"
        request = pb.GenerateRequest(prompt=prompt)
        request.sampling.temperature = 0.0
        request.stopping.max_new_tokens = 1
        generated = await generation_pb2_grpc.TextGenerationStub(channel).Generate(request)
        inspect = introspection_pb2_grpc.IntrospectionStub(channel)
        predicted = await inspect.PredictNext(ipb.PredictNextRequest(text=prompt, num_candidates=1))
        attention = await inspect.Attention(ipb.AttentionRequest(text=prompt, layers=[0]))
    [token] = generated.tokens
    [best] = predicted.candidates
    assert best.id == token.id
    assert math.log(best.probability) == pytest.approx(token.logprob, abs=1e-5)
    ids = torch.tensor([tiny.tokenizer.encode(prompt)])
    float32 = tiny.model.logits(tiny.model(ids, torch.arange(ids.shape[1])[None]))[0, -1].log_softmax(-1)
    assert abs(float(float32[token.id]) - token.logprob) > 1e-4  # int8's numbers, not float32's
    assert list(attention.weights.shape) == [1, 2, ids.shape[1], ids.shape[1]]  # capture runs on packed weights
