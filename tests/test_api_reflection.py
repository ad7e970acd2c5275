"""Server reflection: generic clients (grpcurl, or code with no generated stubs) can find and call
the API from what the server tells them."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.model.weights import LoadedModel
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.api_helpers import serve, stub_for


async def _reflect(
    stub: reflection_pb2_grpc.ServerReflectionStub, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]  # type: ignore[attr-defined]
    assert len(responses) == 1
    response: reflection_pb2.ServerReflectionResponse = responses[0]
    return response


async def test_reflection_lists_the_services(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, served.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        response = await _reflect(stub, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {"gpt2.v1.TextGeneration", "grpc.health.v1.Health"} <= names


async def test_a_client_built_from_reflection_alone_can_generate(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, served.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        response = await _reflect(
            stub, reflection_pb2.ServerReflectionRequest(file_containing_symbol="gpt2.v1.TextGeneration")
        )
        # A fresh pool: nothing of the generated code, only what the server sent.
        pool = descriptor_pool.DescriptorPool()
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in response.file_descriptor_response.file_descriptor_proto]  # fmt: skip
        added: set[str] = set()
        while len(added) < len(files):  # dependencies first
            ready = [f for f in files if f.name not in added and all(d in added for d in f.dependency)]
            assert ready, f"reflection sent {[f.name for f in files]} without all their dependencies"
            for file in ready:
                pool.Add(file)
                added.add(file.name)
        method = pool.FindServiceByName("gpt2.v1.TextGeneration").methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict(
            {"prompt": "The cat sat on the", "sampling": {"seed": "5"}, "stopping": {"maxNewTokens": 6}},
            request_class(),
        )
        generate = channel.unary_unary(
            "/gpt2.v1.TextGeneration/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        reflected = json_format.MessageToDict(await generate(request))

        async with stub_for(served) as generated_stub:
            expected = await generated_stub.Generate(
                pb.GenerateRequest(
                    prompt="The cat sat on the",
                    sampling=pb.SamplingParams(seed=5),
                    stopping=pb.StoppingCriteria(max_new_tokens=6),
                )
            )
    assert reflected["text"] == expected.text
    assert reflected["finishReason"] == pb.FinishReason.Name(expected.finish_reason)
    assert [int(i) for i in reflected["tokenIds"]] == list(expected.token_ids)
