"""Contention, re-measured (not a test): the scenarios of the issue 13 audit against the current
server, each next to the flags that restore the old behaviour where there are such flags.

Every run starts a fresh ``gpt2-serve --model random:tiny`` subprocess on free ports (gRPC and
``--metrics-port``) and drives it with the project's client (raw stubs where a call object is
needed: a batch to cancel, a stream never read, trailers to read):

1. ``one_call``: one ``GenerateBatch`` of ``--batch-items`` items (16-token prompt,
   ``--batch-tokens`` new tokens, EOS ignored), then from another connection two probes of 8 new
   tokens with a 90 s deadline at once: a unary ``Generate`` and a ``GenerateStream`` (time to
   first token). Then the batch is cancelled and the time until the engine is empty is measured.
   Current default vs ``--no-preemption --max-call-share 1``, and (full run) the same with
   ``--no-deadline-admission``, so that nothing refuses the probes either.
2. ``tenants``: ``--auth-token-file`` with tenants ``tenant-a`` and ``tenant-b``. B opens a small
   ``GenerateStream`` (8 new tokens) every 0.5 s, open loop: latency and TTFT p50/p90 idle, then
   while A floods 100 requests of 300 new tokens (half unary, half streams) at concurrency 40.
   ``gpt2_preemptions_total`` and ``gpt2_tenant_queued_requests`` are scraped every 0.5 s.
   Default vs ``--no-preemption``.
3. ``slow``: 40 ``GenerateStream`` calls of 20000 tokens with ``top_logprobs`` 20 (about 0.4 KB
   a token, so that gRPC's 64 KiB window fills in a few seconds) on one channel with
   ``grpc.http2.bdp_probe`` 0 (the window does not grow), never read. Every second: server RSS
   (VmRSS), paused / running / waiting sequences, stalled streams. Then two probe streams (8
   tokens; one with a 60 s deadline, one without), then the first unread stream is read (3 s at
   most), the streams are cancelled and RSS is read 10 s later; the full run repeats the cycle
   once (RSS). Default, ``--stream-idle-timeout 20``, and ``--stream-buffer-tokens 1000000
   --stream-idle-timeout 0`` (an unbounded buffer: the old behaviour, as near as flags get).
4. ``deadline``: 48 unary requests of ``--batch-tokens`` new tokens saturate the batch (32 run,
   16 wait); then 20 requests with a ``--short-deadline`` deadline, 0.1 s apart: how many are
   refused at once (RESOURCE_EXHAUSTED, ErrorInfo reason DEADLINE_UNMEETABLE, RetryInfo) and how
   fast; one control request with a 300 s deadline must be accepted. Default vs
   ``--no-deadline-admission`` (they queue and end DEADLINE_EXCEEDED).

Writes ``bench/results/contention.json`` (settings, machine, every figure) and prints a markdown
table. ``--quick`` (about 4 minutes) uses 512-token long requests, 30 s probe deadlines, 15 s of
unread streams with a 5 s idle limit, one cycle, and leaves out the third runs of scenarios 1
and 3; ``--scenarios`` picks some.

    .venv/bin/python bench/contention.py
    .venv/bin/python bench/contention.py --quick --scenarios one_call,deadline
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import machine
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from gpt2_client import Client, GPT2Error
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from grpc_status import rpc_status
from serve_process import ServeProcess

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
PROMPT = list(range(1000, 1016))  # 16 token ids
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # a channel of its own, not a shared subchannel
SCENARIOS = ("one_call", "tenants", "slow", "deadline")


# -- the server --------------------------------------------------------------------------------


class Server(ServeProcess):
    """``gpt2-serve --model random:tiny`` with ``flags``."""

    def __init__(self, flags: list[str]) -> None:
        super().__init__("random:tiny", flags)

    def start(self, token: str | None = None) -> tuple[str, str]:
        """The gRPC target and the metrics URL, once the server is SERVING and warm."""
        target, metrics_url = self.wait_listening()
        self.wait_serving(target, token)
        with Client(target, timeout=5, token=token) as client:
            for _ in range(3):  # warm: a first step timed, the connection's path
                client.generate(PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True, timeout=60)
        return target, metrics_url


class Metrics:
    """The server's /metrics, scraped on demand and parsed into (name, labels) -> value."""

    def __init__(self, url: str) -> None:
        self.url = url

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith("#") or not (match := SAMPLE.match(line)):
                continue
            labels = frozenset(LABEL.findall(match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
        return samples

    @staticmethod
    def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
        """The sum of the series of ``name`` whose labels include ``labels`` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)

    @staticmethod
    def by_label(
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str
    ) -> dict[str, float]:
        return {dict(ls)[label]: v for (n, ls), v in samples.items() if n == name and label in dict(ls)}

    def gauges(self) -> dict[str, float]:
        s = self.scrape()
        return {
            "running": self.value(s, "gpt2_sequences_running"),
            "waiting": self.value(s, "gpt2_sequences_waiting"),
            "paused": self.value(s, "gpt2_paused_sequences"),
            "stalled_total": self.value(s, "gpt2_streams_stalled_total"),
            "generation_tokens_total": self.value(s, "gpt2_generation_tokens_total"),
        }

    def preemptions(self) -> dict[str, float]:
        return self.by_label(self.scrape(), "gpt2_preemptions_total", "reason")

    def wait_until(self, predicate: Callable[[dict[str, float]], bool], timeout: float) -> float | None:
        """Seconds until ``predicate(gauges)`` holds (polled every 0.1 s), None after ``timeout``."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if predicate(self.gauges()):
                return time.perf_counter() - start
            time.sleep(0.1)
        return None


# -- calls -------------------------------------------------------------------------------------


def request(max_new_tokens: int, top_logprobs: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        top_logprobs=top_logprobs,
    )


def small(max_new_tokens: int = 8) -> dict[str, Any]:
    """The client's keyword arguments of a small greedy request."""
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}


def timed_generate(client: Client, timeout: float, max_new_tokens: int = 8) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        client.generate(PROMPT, timeout=timeout, **small(max_new_tokens))  # type: ignore[arg-type]
    except GPT2Error as exc:
        code = exc.code.name if exc.code is not None else "ERROR"
        return {"code": code, "reason": exc.reason, "latency_s": time.perf_counter() - start}
    return {"code": "OK", "latency_s": time.perf_counter() - start}


def timed_stream(client: Client, timeout: float | None, max_new_tokens: int = 8) -> dict[str, Any]:
    """A stream read to its end: latency, and the time to the first chunk carrying a token."""
    start = time.perf_counter()
    ttft = None
    try:
        for chunk in client.stream(PROMPT, timeout=timeout, **small(max_new_tokens)):  # type: ignore[arg-type]
            if ttft is None and chunk.tokens:
                ttft = time.perf_counter() - start
    except GPT2Error as exc:
        code = exc.code.name if exc.code is not None else "ERROR"
        return {"code": code, "reason": exc.reason, "ttft_s": ttft, "latency_s": time.perf_counter() - start}
    return {"code": "OK", "ttft_s": ttft, "latency_s": time.perf_counter() - start}


def status_of(call: Any) -> dict[str, Any]:
    """Code, ErrorInfo reason and RetryInfo delay of a finished raw call (a grpc.Call)."""
    result: dict[str, Any] = {"code": call.code().name}
    status = rpc_status.from_call(call)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                result["reason"] = info.reason
            elif detail.Unpack(retry):
                result["retry_delay_s"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return result


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def spread(values: list[float]) -> dict[str, Any]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "n": len(values)}


def with_server(
    flags: list[str], body: Callable[[Server, str, Metrics], dict[str, Any]], token: str | None = None
) -> dict[str, Any]:
    server = Server(flags)
    try:
        target, metrics_url = server.start(token)
        result = body(server, target, Metrics(metrics_url))
        result["server_alive_at_end"] = server.alive()
    except Exception as exc:  # a scenario that failed is a finding: keep the others going
        result = {"error": f"{type(exc).__name__}: {exc}", "server_alive_at_end": server.alive()}
        result["server_log_tail"] = list(server.lines)[-30:]
    finally:
        result["server_exit_status"] = server.stop()
    result["flags"] = flags
    return result


# -- 1. one call takes the engine --------------------------------------------------------------


def one_call(settings: dict[str, Any]) -> dict[str, Any]:
    def body(server: Server, target: str, metrics: Metrics) -> dict[str, Any]:
        items, tokens = settings["batch_items"], settings["batch_tokens"]
        with grpc.insecure_channel(target, options=[OWN_CONNECTION]) as channel:
            stub = generation_pb2_grpc.TextGenerationStub(channel)
            batch = pb.GenerateBatchRequest(requests=[request(tokens) for _ in range(items)])
            started = time.perf_counter()
            future = stub.GenerateBatch.future(batch, timeout=3600)
            filled = metrics.wait_until(lambda g: g["running"] + g["waiting"] >= items and g["running"] >= 1, 60)
            time.sleep(1.0)  # decoding for a second
            before = metrics.gauges()
            with Client(target, options=[OWN_CONNECTION]) as probe, concurrent.futures.ThreadPoolExecutor(2) as pool:
                unary = pool.submit(timed_generate, probe, settings["probe_deadline"])
                streamed = pool.submit(timed_stream, probe, settings["probe_deadline"])
                probes = {"unary": unary.result(), "stream": streamed.result()}
            after = metrics.gauges()
            preemptions = metrics.preemptions()
            batch_done = future.done()
            future.cancel()
            cancelled_at = time.perf_counter()
            emptied = metrics.wait_until(lambda g: g["running"] == 0 and g["waiting"] == 0, 60)
            batch_status = status_of(future) if future.done() else {"code": "still running"}
        return {
            "batch_items": items,
            "batch_tokens": tokens,
            "batch_filled_s": filled,
            "gauges_before_probes": before,
            "gauges_after_probes": after,
            "probes": probes,
            "preemptions": preemptions,
            "batch_finished_before_cancel": batch_done,
            "batch_status": batch_status,
            "batch_ran_s": cancelled_at - started,
            "engine_empty_after_cancel_s": emptied,
            "gauges_after_cancel": metrics.gauges(),
        }

    runs = {"current": [], "old": ["--no-preemption", "--max-call-share", "1"]}
    if not settings["quick"]:  # the old behaviour in full: no refusal of the probes either
        runs["old_no_admission"] = [*runs["old"], "--no-deadline-admission"]
    return {label: with_server(flags, body) for label, flags in runs.items()}


# -- 2. tenants ---------------------------------------------------------------------------------


class Sampler:
    """Scrapes the metrics every ``interval`` seconds in a thread: the most queued per tenant,
    the most running and waiting sequences."""

    def __init__(self, metrics: Metrics, interval: float = 0.5) -> None:
        self.metrics = metrics
        self.interval = interval
        self.max_tenant_queued: dict[str, float] = {}
        self.max_running = 0.0
        self.max_waiting = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            s = self.metrics.scrape()
            self.samples += 1
            for tenant, value in Metrics.by_label(s, "gpt2_tenant_queued_requests", "tenant").items():
                self.max_tenant_queued[tenant] = max(value, self.max_tenant_queued.get(tenant, 0.0))
            self.max_running = max(self.max_running, Metrics.value(s, "gpt2_sequences_running"))
            self.max_waiting = max(self.max_waiting, Metrics.value(s, "gpt2_sequences_waiting"))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tenant_b(target: str, token: str, until: Callable[[], bool], count: int, deadline: float) -> list[dict[str, Any]]:
    """B's small streams, one started every 0.5 s (open loop) until ``until()`` or ``count``."""
    results: list[dict[str, Any]] = []
    with (
        Client(target, token=token, options=[OWN_CONNECTION]) as client,
        concurrent.futures.ThreadPoolExecutor(64) as pool,
    ):
        futures = []
        start = time.perf_counter()
        for i in range(count):
            if until():
                break
            time.sleep(max(0.0, start + 0.5 * i - time.perf_counter()))
            futures.append(pool.submit(timed_stream, client, deadline))
        results = [f.result() for f in futures]
    return results


def tenants(settings: dict[str, Any]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="contention-"))
    token_file = tmp / "tokens"
    token_file.write_text("token-of-tenant-a tenant-a\ntoken-of-tenant-b tenant-b\n")

    def body(server: Server, target: str, metrics: Metrics) -> dict[str, Any]:
        idle = tenant_b(target, "token-of-tenant-b", lambda: False, settings["b_idle_samples"], 30)
        flood_done = threading.Event()
        flood_results: list[dict[str, Any]] = []
        flood_times: dict[str, float] = {}

        def flood() -> None:
            n, tokens = settings["a_requests"], settings["a_tokens"]
            with (
                Client(target, token="token-of-tenant-a", options=[OWN_CONNECTION]) as client,
                concurrent.futures.ThreadPoolExecutor(settings["a_concurrency"]) as pool,
            ):
                flood_times["start"] = time.perf_counter()
                calls = [pool.submit(timed_stream if i % 2 else timed_generate, client, 600, tokens) for i in range(n)]
                flood_results.extend(f.result() for f in calls)
                flood_times["end"] = time.perf_counter()
            flood_done.set()

        preempted_before = metrics.preemptions()
        steps_before = metrics.scrape()
        with Sampler(metrics) as sampler:
            thread = threading.Thread(target=flood, daemon=True)
            thread.start()
            saturated = metrics.wait_until(lambda g: g["running"] >= 32 or flood_done.is_set(), 60)
            loaded = tenant_b(target, "token-of-tenant-b", flood_done.is_set, settings["b_flood_samples"], 30)
            thread.join()
        preempted_after = metrics.preemptions()
        steps_after = metrics.scrape()

        def delta(name: str) -> float:
            return Metrics.value(steps_after, name) - Metrics.value(steps_before, name)

        decode_steps = delta("gpt2_step_batch_size_count")
        codes = collections.Counter(f"{r['code']} {r.get('reason', '')}".strip() for r in flood_results)
        return {
            "b_idle": summarize_b(idle),
            "b_under_flood": summarize_b(loaded),
            "flood": {
                "requests": settings["a_requests"],
                "tokens": settings["a_tokens"],
                "concurrency": settings["a_concurrency"],
                "codes": dict(codes),
                "seconds": flood_times.get("end", 0.0) - flood_times.get("start", 0.0),
                "saturated_after_s": saturated,
                "tokens_generated": delta("gpt2_generation_tokens_total"),
                "decode_steps": decode_steps,
                "mean_batch_size": delta("gpt2_step_batch_size_sum") / decode_steps if decode_steps else None,
            },
            "preemptions": {k: preempted_after.get(k, 0) - preempted_before.get(k, 0) for k in preempted_after},
            "max_tenant_queued": sampler.max_tenant_queued,
            "max_running": sampler.max_running,
            "max_waiting": sampler.max_waiting,
            "metric_samples": sampler.samples,
        }

    flags = ["--auth-token-file", str(token_file)]
    try:
        return {
            "current": with_server(flags, body, "token-of-tenant-b"),
            "old": with_server([*flags, "--no-preemption"], body, "token-of-tenant-b"),
        }
    finally:
        token_file.unlink()
        tmp.rmdir()


def summarize_b(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r["code"] == "OK"]
    return {
        "latency_s": spread([r["latency_s"] for r in ok]),
        "ttft_s": spread([r["ttft_s"] for r in ok]),
        "max_latency_s": max((r["latency_s"] for r in ok), default=None),
        "codes": dict(collections.Counter(f"{r['code']} {r.get('reason', '')}".strip() for r in results)),
    }


# -- 3. slow consumers --------------------------------------------------------------------------


def stream_without_deadline(target: str, wait: float) -> dict[str, Any]:
    """A small stream sent with no deadline (deadline admission does not apply), given ``wait``
    seconds; closing the client after that cancels it."""
    client = Client(target, options=[OWN_CONNECTION])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(timed_stream, client, None)
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            return {"code": f"no answer in {wait:g} s", "latency_s": wait}
        finally:
            client.close()


def unread_again(server: Server, target: str, metrics: Metrics, settings: dict[str, Any]) -> dict[str, float]:
    """The same unread streams once more, for as long, then cancelled: RSS at the end and 10 s
    later (memory that is reused, not lost, stays level from one cycle to the next)."""
    options = [("grpc.http2.bdp_probe", 0), OWN_CONNECTION]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        unread = request(settings["slow_tokens"], settings["slow_top_logprobs"])
        calls = [stub.GenerateStream(unread, timeout=3600) for _ in range(settings["slow_streams"])]
        peak = 0.0
        for _ in range(settings["slow_seconds"]):
            time.sleep(1.0)
            peak = max(peak, server.rss_mb())
        for call in calls:
            call.cancel()
        metrics.wait_until(lambda g: g["running"] == 0 and g["waiting"] == 0, 30)
        time.sleep(10)
    return {"peak": peak, "10s_after_cancel": server.rss_mb()}


def slow(settings: dict[str, Any]) -> dict[str, Any]:
    def body(server: Server, target: str, metrics: Metrics) -> dict[str, Any]:
        streams, tokens = settings["slow_streams"], settings["slow_tokens"]
        rss_before = server.rss_mb()
        options = [("grpc.http2.bdp_probe", 0), OWN_CONNECTION]
        samples = []
        with grpc.insecure_channel(target, options=options) as channel:
            stub = generation_pb2_grpc.TextGenerationStub(channel)
            unread = request(tokens, settings["slow_top_logprobs"])
            calls = [stub.GenerateStream(unread, timeout=3600) for _ in range(streams)]
            start = time.perf_counter()
            for second in range(settings["slow_seconds"]):
                time.sleep(max(0.0, start + second + 1 - time.perf_counter()))
                samples.append(
                    {"t_s": round(time.perf_counter() - start, 2), "rss_mb": server.rss_mb(), **metrics.gauges()}
                )
            with Client(target, options=[OWN_CONNECTION]) as client:
                probe = timed_stream(client, 60)
            probe_no_deadline = stream_without_deadline(target, 60)
            # one stream read now: what was sent, then (after an idle end) its status
            read: dict[str, Any] = {"messages": 0, "tokens": 0}
            reader = calls[0]
            until = time.perf_counter() + 3
            try:
                for message in reader:
                    read["messages"] += 1
                    read["tokens"] += len(message.tokens)
                    if time.perf_counter() > until:
                        read["code"] = "still streaming after 3 s of reading"
                        break
                else:
                    read.update(status_of(reader))
            except grpc.RpcError as exc:
                read.update(status_of(exc))
            for call in calls:
                call.cancel()
            cancelled = time.perf_counter()
            rss_at_cancel = server.rss_mb()
            emptied = metrics.wait_until(lambda g: g["running"] == 0 and g["waiting"] == 0 and g["paused"] == 0, 30)
            time.sleep(max(0.0, cancelled + 10 - time.perf_counter()))
            rss_after = server.rss_mb()
        again = [unread_again(server, target, metrics, settings) for _ in range(settings["slow_cycles"] - 1)]
        s = metrics.scrape()
        return {
            "rss_later_cycles_mb": again,
            "streams": streams,
            "max_new_tokens": tokens,
            "rss_before_mb": rss_before,
            "rss_peak_mb": max(x["rss_mb"] for x in samples),
            "rss_at_cancel_mb": rss_at_cancel,
            "rss_10s_after_cancel_mb": rss_after,
            "samples": samples,
            "probe": probe,
            "probe_no_deadline": probe_no_deadline,
            "first_stream_read": read,
            "engine_empty_after_cancel_s": emptied,
            "gauges_after_cancel": metrics.gauges(),
            "streams_stalled_total": Metrics.value(s, "gpt2_streams_stalled_total"),
            "preemptions": Metrics.by_label(s, "gpt2_preemptions_total", "reason"),
        }

    idle = settings["slow_idle_timeout"]
    runs = {"current": [], f"idle_timeout_{idle:g}": ["--stream-idle-timeout", f"{idle:g}"]}
    if not settings["quick"]:
        runs["unbounded_buffer"] = ["--stream-buffer-tokens", "1000000", "--stream-idle-timeout", "0"]
    limit = ["--max-new-tokens-limit", str(max(2048, settings["slow_tokens"]))]
    return {label: with_server([*limit, *flags], body) for label, flags in runs.items()}


# -- 4. deadline-aware admission ----------------------------------------------------------------


def deadline(settings: dict[str, Any]) -> dict[str, Any]:
    def body(server: Server, target: str, metrics: Metrics) -> dict[str, Any]:
        short = settings["short_deadline"]
        with (
            grpc.insecure_channel(target, options=[OWN_CONNECTION]) as flood_channel,
            grpc.insecure_channel(target, options=[OWN_CONNECTION]) as channel,
        ):
            flood_stub = generation_pb2_grpc.TextGenerationStub(flood_channel)
            flood = [flood_stub.Generate.future(request(settings["batch_tokens"]), timeout=3600) for _ in range(48)]
            saturated = metrics.wait_until(lambda g: g["running"] >= 32 and g["waiting"] >= 16, 60)
            time.sleep(2.0)  # steps timed under load
            stub = generation_pb2_grpc.TextGenerationStub(channel)
            ended: dict[int, float] = {}
            started: dict[int, float] = {}
            futures = []
            for i in range(settings["deadline_requests"]):
                started[i] = time.perf_counter()
                future = stub.Generate.future(request(8), timeout=short)
                future.add_done_callback(lambda _f, i=i: ended.__setitem__(i, time.perf_counter()))
                futures.append(future)
                time.sleep(0.1)
            control_start = time.perf_counter()
            control = stub.Generate.future(request(8), timeout=300)
            for future in futures:
                with contextlib.suppress(grpc.RpcError):
                    future.result(timeout=short + 30)
            time.sleep(max(0.0, control_start + 3 - time.perf_counter()))
            control_status = status_of(control) if control.done() else {"code": "accepted, still waiting after 3 s"}
            control.cancel()
            outcomes = []
            for i, future in enumerate(futures):
                outcome = status_of(future)
                outcome["latency_ms"] = (ended[i] - started[i]) * 1000 if i in ended else None
                outcomes.append(outcome)
            for future in flood:
                future.cancel()
            s = metrics.scrape()
            emptied = metrics.wait_until(lambda g: g["running"] == 0 and g["waiting"] == 0, 60)
        codes = collections.Counter(f"{o['code']} {o.get('reason', '')}".strip() for o in outcomes)
        refused = [o for o in outcomes if o.get("reason") == "DEADLINE_UNMEETABLE"]
        return {
            "deadline_s": short,
            "requests": len(outcomes),
            "saturated_after_s": saturated,
            "codes": dict(codes),
            "refused_unmeetable": len(refused),
            "refused_latency_ms": spread([o["latency_ms"] for o in refused]),
            "latency_ms": spread([o["latency_ms"] for o in outcomes]),
            "retry_delay_s": spread([o["retry_delay_s"] for o in refused if "retry_delay_s" in o]),
            "retry_delays_s": [o.get("retry_delay_s") for o in refused],
            "control_300s": control_status,
            "rejected_total": Metrics.by_label(s, "gpt2_requests_rejected_total", "reason"),
            "failed_total": Metrics.by_label(s, "gpt2_requests_failed_total", "reason"),
            "engine_empty_after_cancel_s": emptied,
            "outcomes": outcomes,
        }

    return {"current": with_server([], body), "old": with_server(["--no-deadline-admission"], body)}


# -- report -------------------------------------------------------------------------------------


def fmt_s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def fmt_probe(probe: dict[str, Any]) -> str:
    text = f"{probe['latency_s']:.2f} s {probe['code']}"
    if probe.get("reason"):
        text += f" ({probe['reason']})"
    if "ttft_s" in probe:
        text += f", TTFT {fmt_s(probe['ttft_s'])}"
    return text


def fmt_spread(value: dict[str, Any], scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    if value["p50"] is None:
        return f"- (n={value['n']})"
    return f"{value['p50'] * scale:.{digits}f} / {value['p90'] * scale:.{digits}f} {unit} (n={value['n']})"


def fmt_counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items()) if v) or "0"


def _gauges(g: dict[str, float]) -> str:
    return f"{g['running']:g} / {g['waiting']:g}"


def _slow_read(r: dict[str, Any]) -> str:
    read = r["first_stream_read"]
    return f"{read['tokens']} tokens, then {read['code']} {read.get('reason', '')}".strip()


Measure = tuple[str, Callable[[dict[str, Any]], str]]

MEASURES: dict[str, tuple[str, list[Measure]]] = {
    "one_call": (
        "1. one call: GenerateBatch of {batch_items} x {batch_tokens} new tokens, then 2 probes (8 tokens, {probe_deadline:g} s deadline)",
        [
            ("running / waiting when the probes start", lambda r: _gauges(r["gauges_before_probes"])),
            ("unary probe: latency, outcome", lambda r: fmt_probe(r["probes"]["unary"])),
            ("stream probe: latency, outcome, TTFT", lambda r: fmt_probe(r["probes"]["stream"])),
            ("preemptions", lambda r: fmt_counts(r["preemptions"])),
            ("engine empty after the batch is cancelled", lambda r: fmt_s(r["engine_empty_after_cancel_s"])),
        ],
    ),
    "tenants": (
        "2. tenants: A floods {a_requests} x {a_tokens} tokens at concurrency {a_concurrency}; B: a stream of 8 tokens every 0.5 s",
        [
            ("B latency p50 / p90, idle", lambda r: fmt_spread(r["b_idle"]["latency_s"])),
            ("B TTFT p50 / p90, idle", lambda r: fmt_spread(r["b_idle"]["ttft_s"])),
            ("B latency p50 / p90, under A's flood", lambda r: fmt_spread(r["b_under_flood"]["latency_s"])),
            ("B TTFT p50 / p90, under A's flood", lambda r: fmt_spread(r["b_under_flood"]["ttft_s"])),
            ("B max latency under the flood", lambda r: fmt_s(r["b_under_flood"]["max_latency_s"])),
            ("B outcomes under the flood", lambda r: fmt_counts(r["b_under_flood"]["codes"])),
            ("gpt2_preemptions_total during the flood", lambda r: fmt_counts(r["preemptions"])),
            ("max gpt2_tenant_queued_requests", lambda r: fmt_counts(r["max_tenant_queued"])),
            ("A's flood: duration, outcomes", lambda r: f"{r['flood']['seconds']:.1f} s, {fmt_counts(r['flood']['codes'])}"),
            ("tokens/s during the flood, mean decode batch",
             lambda r: f"{r['flood']['tokens_generated'] / r['flood']['seconds']:.0f}, {r['flood']['mean_batch_size']:.1f}"),
        ],
    ),
    "slow": (
        "3. slow readers: {slow_streams} GenerateStream of {slow_tokens} tokens (top_logprobs {slow_top_logprobs}) never read, {slow_seconds} s",
        [
            ("server RSS before / peak / 10 s after cancel",
             lambda r: f"{r['rss_before_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_10s_after_cancel_mb']:.0f} MB"),
            ("RSS peak / 10 s after cancel, second cycle",
             lambda r: " / ".join(f"{c['peak']:.0f} / {c['10s_after_cancel']:.0f} MB" for c in r["rss_later_cycles_mb"]) or "-"),
            ("paused / running / waiting at the end (peak paused)",
             lambda r: f"{r['samples'][-1]['paused']:g} / {r['samples'][-1]['running']:g} / "
             f"{r['samples'][-1]['waiting']:g} ({max(x['paused'] for x in r['samples']):g})"),
            ("tokens generated for the unread streams", lambda r: f"{r['samples'][-1]['generation_tokens_total']:g}"),
            ("probe stream (8 tokens, 60 s deadline) meanwhile", lambda r: fmt_probe(r["probe"])),
            ("probe stream without deadline meanwhile", lambda r: fmt_probe(r["probe_no_deadline"])),
            ("gpt2_streams_stalled_total", lambda r: f"{r['streams_stalled_total']:g}"),
            ("one unread stream, read afterwards", _slow_read),
            ("engine empty after cancel", lambda r: fmt_s(r["engine_empty_after_cancel_s"])),
        ],
    ),
    "deadline": (
        "4. deadline admission: batch saturated (32 running, 16 waiting), {deadline_requests} requests with a {short_deadline:g} s deadline",
        [
            ("outcomes", lambda r: fmt_counts(r["codes"])),
            ("time to the answer p50 / p90", lambda r: fmt_spread(r["latency_ms"], unit="ms", digits=1)),
            ("RetryInfo delay p50 / p90", lambda r: fmt_spread(r["retry_delay_s"], digits=1)),
            ("control request (300 s deadline)", lambda r: r["control_300s"]["code"]),
        ],
    ),
}  # fmt: skip


def shown_flags(flags: list[str]) -> str:
    """The flags that make a run differ (the token file and the new-token limit left out)."""
    shown, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ("--auth-token-file", "--max-new-tokens-limit"):
            skip = True
        else:
            shown.append(flag)
    return f"`{' '.join(shown)}`" if shown else "default"


def report(results: dict[str, Any], settings: dict[str, Any]) -> str:
    """One markdown table: per scenario a row of each run's flags, then a row per measure."""
    lines = ["| scenario | measure | run 1 | run 2 | run 3 |", "|---|---|---|---|---|"]
    for name, (title, measures) in MEASURES.items():
        if name not in results:
            continue
        runs = [r for label, r in results[name].items() if isinstance(r, dict)]
        pad = [""] * (3 - len(runs))
        flags = [shown_flags(r.get("flags", [])) for r in runs]
        lines.append(f"| **{title.format(**settings)}** | flags | " + " | ".join(flags + pad) + " |")
        for measure, show in measures:
            cells = []
            for r in runs:
                try:
                    cells.append("FAILED: " + r["error"] if "error" in r else show(r))
                except (KeyError, TypeError, ValueError) as exc:
                    cells.append(f"n/a ({type(exc).__name__})")
            lines.append(f"| | {measure} | " + " | ".join(cells + pad) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (< 4 minutes in all)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--batch-tokens", type=int, help="new tokens of each long request (2048; quick 512)")
    parser.add_argument("--short-deadline", type=float, default=2.0, help="scenario 4's deadline, seconds")
    parser.add_argument("--output", type=Path, help="results JSON (bench/results/contention[-quick].json)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    quick = args.quick
    settings: dict[str, Any] = {
        "quick": quick,
        "model": "random:tiny",
        "batch_items": 64,
        "batch_tokens": args.batch_tokens or (512 if quick else 2048),
        "probe_deadline": 90.0 if not quick else 30.0,
        "a_requests": 100,
        "a_tokens": 300,
        "a_concurrency": 40,
        "b_idle_samples": 10 if quick else 20,
        "b_flood_samples": 200,
        "slow_streams": 40,
        "slow_tokens": 20000,
        "slow_top_logprobs": 20,
        "slow_seconds": 15 if quick else 30,
        "slow_cycles": 1 if quick else 2,
        "slow_idle_timeout": 5.0 if quick else 20.0,
        "short_deadline": args.short_deadline,
        "deadline_requests": 20,
    }
    output = args.output or RESULTS_DIR / ("contention-quick.json" if quick else "contention.json")
    scenarios: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "one_call": one_call,
        "tenants": tenants,
        "slow": slow,
        "deadline": deadline,
    }
    started = time.time()
    results: dict[str, Any] = {}
    for name in chosen:
        t0 = time.perf_counter()
        print(f"-- {name}", file=sys.stderr, flush=True)
        results[name] = scenarios[name](settings)
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"   {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    document = {
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "minutes": (time.time() - started) / 60,
        "settings": settings,
        "machine": machine.describe(),
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(report(results, settings))
    print(f"\nwrote {output} ({document['minutes']:.1f} minutes)")


if __name__ == "__main__":
    main()
