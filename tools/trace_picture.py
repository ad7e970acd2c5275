"""Draw docs/images/trace.png: a real trace of one GenerateStream call, as a Gantt chart.

A server runs in this process on random:tiny with two batch places and a 128-token context window,
traced into the OpenTelemetry SDK's in-memory exporter (as tests/test_tracing.py does). Two long
generations take the places first, so the traced call waits in the queue; its 100-token prompt is
prefilled in chunks of 32; it generates 80 tokens in a 128-token window, so its window shifts. Each span is a bar, each
span event a mark.

    .venv/bin/python tools/trace_picture.py [--out docs/images/trace.png]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.api_helpers

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from gpt2_client.proto import common_pb2  # noqa: E402
from gpt2_client.proto import generation_pb2 as pb  # noqa: E402
from gpt2_service.config import EngineConfig  # noqa: E402
from gpt2_service.model.weights import load_model  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from tests.api_helpers import serve, stub_for  # noqa: E402

TRACEPARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


async def record() -> list[ReadableSpan]:
    provider, memory = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    config = EngineConfig(
        model="random:tiny", max_batch_size=2, context_window=128, max_prefill_tokens=32, stage_timing=False
    )
    traced = pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=[(i * 37) % 5000 + 10 for i in range(100)]),
        sampling=pb.SamplingParams(temperature=0.8, seed=1),
        stopping=pb.StoppingCriteria(max_new_tokens=80, ignore_eos=True),
    )
    busy = pb.GenerateRequest(
        prompt="Once upon a time", stopping=pb.StoppingCriteria(max_new_tokens=150, ignore_eos=True)
    )
    async with serve(load_model("random:tiny"), engine_config=config, tracer_provider=provider) as served:
        async with stub_for(served) as stub:
            others = [asyncio.ensure_future(stub.Generate(busy)) for _ in range(2)]
            await asyncio.sleep(0.05)
            async for _ in stub.GenerateStream(traced, metadata=TRACEPARENT):
                pass
            await asyncio.gather(*others)
        for _ in range(200):
            spans = list(memory.get_finished_spans())
            if any(s.name.endswith("GenerateStream") for s in spans):
                break
            await asyncio.sleep(0.01)
    rpc = next(s for s in spans if s.name.endswith("GenerateStream"))
    return [rpc, *(s for s in spans if s.parent is not None and s.parent.span_id == rpc.context.span_id)]


def draw(spans: list[ReadableSpan], out: Path) -> None:
    t0 = min(s.start_time or 0 for s in spans)

    def ms(ns: int | None) -> float:
        return ((ns or t0) - t0) / 1e6

    fig, ax = plt.subplots(figsize=(10, 3.2))
    colours = {"queue": "#bbbbbb", "prefill": "#4c72b0", "decode": "#55a868", "response": "#c44e52"}
    for row, span in enumerate(spans):
        start, end = ms(span.start_time), ms(span.end_time)
        colour = "#8172b2" if span.kind is SpanKind.SERVER else colours.get(span.name, "#999999")
        ax.barh(row, end - start, left=start, color=colour, height=0.6)
        attributes = dict(span.attributes or {})
        note = f"{end - start:.1f} ms"
        if span.name == "prefill":
            note += f", {attributes['gpt2.prefill.chunks']} chunks, {attributes['gpt2.prefill.tokens']} tokens"
        if span.name == "decode":
            note += f", {attributes['gen_ai.usage.output_tokens']} tokens"
        ax.text(end + 2, row, note, va="center", fontsize=8)
        for event in span.events:
            marker = {"first_token": "v", "context_shift": "x", "finish": "s"}.get(event.name, "o")
            ax.plot(ms(event.timestamp), row, marker=marker, color="black", markersize=6, label=event.name)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(range(len(spans)), [s.name.replace("gpt2.v1.TextGeneration/", "RPC ") for s in spans])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the call arrived")
    ax.set_title(
        "A traced GenerateStream: queued behind 2 busy places, 100-token prompt, 80 tokens, window 128", fontsize=10
    )
    ax.set_xlim(0, ms(max(s.end_time or 0 for s in spans)) * 1.25)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "trace.png")
    args = parser.parse_args()
    draw(asyncio.run(record()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
