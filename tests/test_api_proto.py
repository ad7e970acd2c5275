"""The committed generated code matches proto/ (``make proto`` regenerates it), and the .proto
files follow the package's conventions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpt2_client.proto import common_pb2, introspection_pb2
from gpt2_client.proto import generation_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate_python.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_generated_modules_keep_the_proto_paths_other_languages_use() -> None:
    assert pb.DESCRIPTOR.name == "gpt2/v1/generation.proto"
    assert pb.DESCRIPTOR.package == "gpt2.v1"
    assert list(pb.DESCRIPTOR.dependencies) == [common_pb2.DESCRIPTOR]
    assert all("gpt2_client" not in p.read_text() for p in (ROOT / "proto" / "gpt2" / "v1").glob("*.proto"))


def test_every_enum_starts_with_unspecified_zero() -> None:
    for module in (pb, common_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name


def test_the_contract_names_are_there() -> None:
    service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
    assert set(service.methods_by_name) == {
        "Generate", "GenerateStream", "GenerateBatch", "GetModelInfo", "Score", "ScoreBatch",
    }  # fmt: skip
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert [v.name for v in pb.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED", "LENGTH", "EOS", "STOP_SEQUENCE", "STOP_TOKEN", "CONTEXT_WINDOW",
        "CONSTRAINT_COMPLETE", "CONSTRAINT_UNSATISFIED",
    ]  # fmt: skip
    introspection = introspection_pb2.DESCRIPTOR.services_by_name["Introspection"]
    assert set(introspection.methods_by_name) == {
        "Tokenize", "Detokenize", "Embed", "Attention", "HiddenStates", "PredictNext", "Trace", "TraceGeneration",
    }  # fmt: skip
    assert introspection.methods_by_name["TraceGeneration"].server_streaming
    request = pb.GenerateRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["input"].fields] == ["prompt", "prompt_token_ids"]
    assert [f.name for f in pb.Constraint.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "regex", "json_schema", "choice", "grammar",
    ]  # fmt: skip
    assert {"n", "echo", "constraint"} <= set(request.fields_by_name)
    assert {"logit_bias", "allowed_token_ids", "banned_token_ids"} <= set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    assert "bad_words" in pb.StoppingCriteria.DESCRIPTOR.fields_by_name
    assert [f.name for f in pb.Choice.DESCRIPTOR.fields] == [
        "index", "text", "tokens", "finish_reason", "stop_sequence", "seed",
    ]  # fmt: skip
    assert "cached_prompt_tokens" in pb.Usage.DESCRIPTOR.fields_by_name
    assert "choice_index" in pb.GenerateStreamResponse.DESCRIPTOR.fields_by_name
    score = pb.ScoreRequest.DESCRIPTOR  # DESIGN.md section 8
    assert [f.name for f in score.oneofs_by_name["input"].fields] == ["text", "token_ids"]
    assert [f.name for f in score.oneofs_by_name["context"].fields] == ["context_text", "context_token_ids"]
    assert {"request_id", "add_bos", "top_logprobs"} <= set(score.fields_by_name)
    assert {"request_id", "tokens", "total_logprob", "mean_nll", "perplexity", "usage"} <= set(
        pb.ScoreResponse.DESCRIPTOR.fields_by_name
    )
    assert [f.name for f in pb.ScoredToken.DESCRIPTOR.fields] == ["id", "text", "logprob", "rank", "top_logprobs"]
    # "unset" differs from zero for these, so they are proto3 optional
    sampling = pb.SamplingParams.DESCRIPTOR
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "seed"):
        assert sampling.fields_by_name[name].has_presence, name
    assert pb.StoppingCriteria.DESCRIPTOR.fields_by_name["max_new_tokens"].has_presence
