"""Introspection next to generation (not a test): a small Generate's latency, idle and while
Introspection clients hammer the server with 1024-token model RPCs (issue 13, item 4).

A ``gpt2-serve --model random:tiny`` subprocess (its own process, like a deployment; extra flags
after ``--``) is measured in three phases, each with one client thread sending small Generate
calls (16-token prompt, 8 new tokens, greedy) one after another:
- idle: nothing else runs;
- trace: ``--clients`` more threads each call ``Trace`` on a 1024-token input in a loop;
- hidden_states: the same with ``HiddenStates`` (norms of every layer and position).
A model RPC refused with RESOURCE_EXHAUSTED (``--max-model-rpcs``) is counted and retried after
``--retry-ms``. Reported per phase: the Generate's p50 / p90 latency, the model RPCs answered
and refused per second, and the ratio of each loaded p50 to the idle one (the issue's bound:
at most 2). Writes ``bench/results/contention_introspection.json`` and prints a table.

    .venv/bin/python bench/contention_introspection.py
    .venv/bin/python bench/contention_introspection.py --label before -- --introspection-share 1.0 --max-model-rpcs 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from gpt2_client.proto import common_pb2, generation_pb2_grpc, introspection_pb2_grpc
from gpt2_client.proto import generation_pb2 as gen_pb
from gpt2_client.proto import introspection_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
BOUND = 2.0  # the bound: loaded p50 <= 2x idle p50
PROMPT_IDS = list(range(1000, 1016))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Server:
    """``gpt2-serve --model random:tiny`` on 127.0.0.1, a free port read back from its log (a
    temporary file: a thread reading a pipe of access lines would compete with the clients)."""

    def __init__(self, flags: list[str]) -> None:
        command = [
            sys.executable, "-m", "gpt2_service", "--model", "random:tiny", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", *flags,
        ]  # fmt: skip
        self._log = Path(tempfile.mkdtemp()) / "gpt2-serve.log"
        with self._log.open("a") as log:  # appends: the server's writes and our reads keep their own offsets
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=log)
        self.port: int | None = None

    @property
    def _lines(self) -> list[str]:
        with self._log.open() as log:
            return list(itertools.islice(log, 200))  # the start-up lines, for an error

    def _find_port(self) -> None:
        for line in self._lines:
            if match := LISTENING.search(line):
                self.port = int(match.group(1))

    def wait_serving(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while self.port is None:
            self._find_port()
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gpt2-serve did not start:\n" + "".join(self._lines))
            time.sleep(0.05)
        target = f"127.0.0.1:{self.port}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return target
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gpt2-serve never SERVING:\n" + "".join(self._lines))
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._log.parent, ignore_errors=True)


def generate_latencies(target: str, count: int) -> list[float]:
    """``count`` small Generate calls one after another; their latencies in seconds."""
    request = gen_pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT_IDS),
        sampling=gen_pb.SamplingParams(temperature=0.0),
        stopping=gen_pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
    )
    with grpc.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        stub.Generate(request, timeout=60)  # the connection, warm
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            stub.Generate(request, timeout=60)
            latencies.append(time.perf_counter() - start)
    return latencies


def _load_clients(target: str, rpc: str, clients: int, tokens: int, retry_s: float, conn: Connection) -> None:
    """In a process of its own: ``clients`` threads, each calling ``rpc`` on a ``tokens``-token
    input in a loop (a refused call retries after ``retry_s``). Sends "running" once a call is
    answered; on "reset" zeroes its counts; on "stop" sends (answered, refused, errors)."""
    rng = random.Random(0)
    ids = common_pb2.TokenIds(ids=[rng.randrange(50000) for _ in range(tokens)])
    request: Any = pb.TraceRequest(token_ids=ids) if rpc == "Trace" else pb.HiddenStatesRequest(token_ids=ids)
    stop, lock = threading.Event(), threading.Lock()
    counts, errors, running = [0, 0], [], threading.Event()

    def loop() -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(target, options=options) as channel:
            call = getattr(introspection_pb2_grpc.IntrospectionStub(channel), rpc)
            while not stop.is_set():
                try:
                    call(request, timeout=120)
                except grpc.RpcError as exc:
                    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                        with lock:
                            errors.append(f"{exc.code().name}: {exc.details()}")
                        return
                    with lock:
                        counts[1] += 1
                    stop.wait(retry_s)
                else:
                    with lock:
                        counts[0] += 1
                        if counts[0] == clients and not running.is_set():
                            running.set()
                            conn.send("running")

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while (message := conn.recv()) != "stop":
        if message == "reset":
            with lock:
                counts[:] = [0, 0]
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    conn.send((counts[0], counts[1], errors))


class ModelLoad:
    """The model-RPC clients, in a process of their own as callers are (threads of this process
    would take the GIL from the measured Generate client and inflate its latency)."""

    def __init__(self, target: str, rpc: str, clients: int, tokens: int, retry_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_load_clients, args=(target, rpc, clients, tokens, retry_s, child), daemon=True
        )
        self.answered = self.refused = 0
        self.errors: list[str] = []

    def __enter__(self) -> ModelLoad:
        self._process.start()
        if not self._conn.poll(120) or self._conn.recv() != "running":
            raise RuntimeError("the model-RPC clients were never answered")
        time.sleep(1.0)  # every client busy before the Generate calls start
        self._conn.send("reset")
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self._conn.send("stop")
        self.answered, self.refused, self.errors = self._conn.recv()
        self._process.join(timeout=120)


def measure(flags: list[str], samples: int, clients: int, tokens: int, retry_s: float) -> dict[str, Any]:
    server = Server(flags)
    try:
        target = server.wait_serving()
        generate_latencies(target, 10)  # warm-up
        phases: dict[str, Any] = {}
        idle = generate_latencies(target, samples)
        phases["idle"] = {"p50_s": percentile(idle, 50), "p90_s": percentile(idle, 90), "samples": len(idle)}
        for name, rpc in (("trace", "Trace"), ("hidden_states", "HiddenStates")):
            with ModelLoad(target, rpc, clients, tokens, retry_s) as load:
                loaded = generate_latencies(target, samples)
            if load.errors:
                raise RuntimeError(f"{rpc} failed: {load.errors[0]}")
            phases[name] = {
                "p50_s": percentile(loaded, 50),
                "p90_s": percentile(loaded, 90),
                "samples": len(loaded),
                "model_rpcs_per_s": load.answered / load.seconds,
                "refused_per_s": load.refused / load.seconds,
                "p50_over_idle": percentile(loaded, 50) / phases["idle"]["p50_s"],
            }
        return phases
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40, help="Generate calls per phase")
    parser.add_argument("--clients", type=int, default=4, help="concurrent Introspection clients")
    parser.add_argument("--tokens", type=int, default=1024, help="input tokens of each model RPC")
    parser.add_argument("--retry-ms", type=float, default=50.0, help="a refused client's pause before it retries")
    parser.add_argument("--label", default="current", help="the key of this run in the results file")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "contention_introspection.json")
    parser.add_argument("flags", nargs="*", help="extra gpt2-serve flags (after --)")
    args = parser.parse_args()
    phases = measure(args.flags, args.samples, args.clients, args.tokens, args.retry_ms / 1000)
    print(f"\n{args.label}: gpt2-serve --model random:tiny {' '.join(args.flags)}")
    print(f"{args.clients} clients x {args.tokens} tokens; Generate: 16-token prompt, 8 new tokens")
    print("| phase | Generate p50 (s) | p90 (s) | p50 / idle | model RPCs/s | refused/s |")
    print("|---|---|---|---|---|---|")
    for name, phase in phases.items():
        ratio = phase.get("p50_over_idle", 1.0)
        rate, refused = phase.get("model_rpcs_per_s", 0.0), phase.get("refused_per_s", 0.0)
        print(f"| {name} | {phase['p50_s']:.4f} | {phase['p90_s']:.4f} | {ratio:.2f} | {rate:.1f} | {refused:.1f} |")
    results: dict[str, Any] = {}
    if args.output.exists():
        results = json.loads(args.output.read_text())
    results[args.label] = {
        "flags": args.flags,
        "clients": args.clients,
        "tokens": args.tokens,
        "samples": args.samples,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "bound": BOUND,
        "within_bound": all(p.get("p50_over_idle", 1.0) <= BOUND for p in phases.values()),
        "phases": phases,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
