"""Introspection latency (not a test): each gpt2.v1.Introspection RPC on a 64-token input.

A server with its engine runs in this process (``random:gpt2`` by default, idle: no generation
running) and each RPC is called through a real localhost socket with the generated async stub:
a few warm-up calls, then ``--repeat`` timed calls one after another. Reported per RPC (and for
a few option variants): round-trip latency p50 / p90 / min in milliseconds and the size of the
serialized response. The client shares the event loop and the CPU cores with the server, so
these are upper bounds for a remote client. Writes ``bench/results/introspection.json`` and
prints a markdown table.

    .venv/bin/python bench/introspection_latency.py                  # random:gpt2, 64 tokens
    .venv/bin/python bench/introspection_latency.py --device cuda --repeat 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from gpt2_client.proto import common_pb2, introspection_pb2_grpc
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_service.api.introspection import max_response_bytes
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import load_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PASSAGE = (
    "The cat sat on the mat and looked out of the window at the river, where a small boat drifted "
    "slowly past the old stone bank. Nobody on the boat noticed the cat, and the cat did not seem to "
    "mind; it had seen many boats before, and it would see many more before the long summer ended."
)


def _cases(ids: list[int], text: str) -> list[tuple[str, str, Callable[[Any], Awaitable[Any]]]]:
    """(rpc, variant, call) for every measured request."""
    token_ids = common_pb2.TokenIds(ids=ids)
    bf16 = pb.TENSOR_DTYPE_BFLOAT16
    return [
        ("Tokenize", "text", lambda s: s.Tokenize(pb.TokenizeRequest(text=text))),
        ("Detokenize", "64 ids", lambda s: s.Detokenize(pb.DetokenizeRequest(token_ids=token_ids))),
        ("Embed", "float32", lambda s: s.Embed(pb.EmbedRequest(token_ids=token_ids))),
        ("Embed", "bfloat16", lambda s: s.Embed(pb.EmbedRequest(token_ids=token_ids, dtype=bf16))),
        ("Attention", "all layers and heads", lambda s: s.Attention(pb.AttentionRequest(token_ids=token_ids))),
        ("Attention", "all, bfloat16", lambda s: s.Attention(pb.AttentionRequest(token_ids=token_ids, dtype=bf16))),
        ("Attention", "layer 5, head 1", lambda s: s.Attention(pb.AttentionRequest(token_ids=token_ids, layers=[5], heads=[1]))),
        ("Attention", "all + scores", lambda s: s.Attention(pb.AttentionRequest(token_ids=token_ids, include_scores=True))),
        ("HiddenStates", "norms", lambda s: s.HiddenStates(pb.HiddenStatesRequest(token_ids=token_ids))),
        ("HiddenStates", "norms + vectors", lambda s: s.HiddenStates(pb.HiddenStatesRequest(token_ids=token_ids, include_vectors=True))),
        ("PredictNext", "defaults (10 candidates, 1 draw)", lambda s: s.PredictNext(pb.PredictNextRequest(token_ids=token_ids, seed=1))),
        ("PredictNext", "top_k 50, T 0.7, 100 draws", lambda s: s.PredictNext(pb.PredictNextRequest(token_ids=token_ids, top_k=50, temperature=0.7, seed=1, num_samples=100))),
        ("Trace", "defaults", lambda s: s.Trace(pb.TraceRequest(token_ids=token_ids, seed=1))),
    ]  # fmt: skip


async def run(model: str, device: str, num_tokens: int, repeat: int, warmup: int) -> dict[str, Any]:
    load_before = round(os.getloadavg()[0], 2)
    loaded = await asyncio.to_thread(load_model, model, device=device)
    engine_config = EngineConfig(model=model, device=device, stage_timing=False)
    server_config = ServerConfig(
        host="127.0.0.1", port=0, max_message_bytes=64 * 2**20, max_introspection_bytes=64 * 2**20
    )
    server = GenerationServer(server_config)
    port = await server.start()
    engine = Engine(loaded, engine_config)
    await engine.start()
    await server.attach(engine)
    rows: list[dict[str, Any]] = []
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub: Any = introspection_pb2_grpc.IntrospectionStub(channel)
            ids = list((await stub.Tokenize(pb.TokenizeRequest(text=PASSAGE))).tokens)
            ids = [t.id for t in ids][:num_tokens]
            text = (await stub.Detokenize(pb.DetokenizeRequest(token_ids=common_pb2.TokenIds(ids=ids)))).text
            assert len((await stub.Tokenize(pb.TokenizeRequest(text=text))).tokens) == num_tokens
            for rpc, variant, call in _cases(ids, text):
                for _ in range(warmup):
                    await call(stub)
                times: list[float] = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    response = await call(stub)
                    times.append((time.perf_counter() - started) * 1000)
                times.sort()
                row = {
                    "rpc": rpc,
                    "variant": variant,
                    "p50_ms": round(statistics.median(times), 3),
                    "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 3),
                    "min_ms": round(times[0], 3),
                    "response_bytes": response.ByteSize(),
                }
                rows.append(row)
                logging.info("%s", row)
    finally:
        await server.stop()
        await engine.shutdown()
    return {
        "model": model,
        "device": str(next(loaded.model.parameters()).device),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "input_tokens": num_tokens,
        "repeat": repeat,
        "torch_threads": torch.get_num_threads(),
        "max_response_bytes": max_response_bytes(server_config),
        "load_average_1m": [load_before, round(os.getloadavg()[0], 2)],  # before, after: a shared machine shows here
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} on {report['device']}, {report['input_tokens']}-token input, "
        f"{report['repeat']} calls each (localhost gRPC, idle server)",
        "",
        "| RPC | variant | p50 ms | p90 ms | min ms | response |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        size = r["response_bytes"]
        human = (
            f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB" if size >= 2**10 else f"{size} B"
        )
        lines.append(
            f"| {r['rpc']} | {r['variant']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['min_ms']:.1f} | {human} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "introspection.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args.model, args.device, args.tokens, args.repeat, args.warmup))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
