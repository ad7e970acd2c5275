"""Lint a live /metrics scrape with ``promtool check metrics`` (``make check`` runs this).

Starts ``gpt2-serve --model random:tiny`` on free ports (gRPC and metrics both 0, read back from
its log), waits for health SERVING, sends one good and one invalid Generate so that the labelled
series exist, scrapes /metrics (the contention series must be there, at 0), pipes it to promtool
(any output fails), and stops the server with SIGTERM (it must exit 0). Exit status 0 when all is
clean; the reason otherwise.

    .venv/bin/python tools/check_metrics.py
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 120.0
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
METRICS_AT = re.compile(r"metrics on (http://\S+/metrics)")
EXPECTED = (
    'gpt2_requests_total{code="OK",rpc="Generate"} 1.0',
    'gpt2_requests_rejected_total{reason="invalid"} 1.0',
    # the contention series exist from the start, at 0
    'gpt2_requests_rejected_total{reason="tenant_queue_full"} 0.0',
    'gpt2_preemptions_total{reason="priority"} 0.0',
    "gpt2_paused_sequences 0.0",
    "gpt2_streams_stalled_total 0.0",
)


class Server:
    """gpt2-serve in a subprocess, its log collected by a thread."""

    def __init__(self) -> None:
        command = [
            sys.executable, "-m", "gpt2_service", "--model", "random:tiny", "--host", "127.0.0.1",
            "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--context-window", "128",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())

    def find(self, pattern: re.Pattern[str], deadline: float) -> str:
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.search(line):
                    return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no log line matching {pattern.pattern!r}; gpt2-serve logged:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9


@contextmanager
def running_server() -> Iterator[Server]:
    server = Server()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def wait_serving(channel: grpc.Channel, deadline: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gpt2-serve did not become SERVING in time")


def workload(channel: grpc.Channel) -> None:
    stub = generation_pb2_grpc.TextGenerationStub(channel)
    stub.Generate(pb.GenerateRequest(prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=4)), timeout=30)
    try:
        stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(temperature=-1.0)), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
    else:
        raise RuntimeError("a negative temperature was accepted")


def scrape(url: str, deadline: float) -> str:
    """The exposition, once the RPCs above are counted (they are, when each call has ended)."""
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        if all(sample in text for sample in EXPECTED) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def main() -> int:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("check_metrics: promtool not found (Debian/Ubuntu package 'prometheus')", file=sys.stderr)
        return 2
    deadline = time.monotonic() + START_TIMEOUT_S
    with running_server() as server:
        port = int(server.find(LISTENING, deadline))
        url = server.find(METRICS_AT, deadline)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, deadline)
            workload(channel)
        text = scrape(url, time.monotonic() + 10)
        status = server.stop()
    missing = [sample for sample in EXPECTED if sample not in text]
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = []
    if missing:
        problems.append(f"samples missing from the scrape: {missing}")
    if checked.returncode != 0 or checked.stdout or checked.stderr:
        problems.append(f"promtool check metrics (exit {checked.returncode}):\n{checked.stdout}{checked.stderr}")
    if status != 0:
        problems.append(f"gpt2-serve exited {status} after SIGTERM; its log:\n{server.log()}")
    if problems:
        print("check_metrics: FAILED\n" + "\n".join(problems), file=sys.stderr)
        return 1
    families = len({line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")})
    print(f"check_metrics: promtool check metrics is clean on a live scrape of {url} ({families} families)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
