"""``gpt2-serve`` as a process, for the tests that need the real entry point (its flags, its
metrics endpoint, its log): free gRPC and metrics ports read back from its log, health SERVING
before use, SIGTERM at the end; plus a parser for the Prometheus text exposition."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
METRICS_AT = re.compile(r"metrics on http://\S+:(\d+)/metrics")
START_TIMEOUT_S = 60.0

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def parse_exposition(text: str) -> Samples:
    """Every sample of a scrape: ``(name, labels) -> value``."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def poll(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll the server's observable state (bounded) until ``condition`` holds.

    The one poll the tests keep: the server here is another process, which can signal nothing to
    the test. In process, await instead: ``Engine.wait_for``, or ``api_helpers.Awaited``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(0.01)


class ServeProcess:
    """A running ``gpt2-serve --model random:tiny`` on 127.0.0.1, with its log lines."""

    def __init__(self, flags: tuple[str, ...]) -> None:
        command = [
            sys.executable, "-m", "gpt2_service", "--model", "random:tiny", "--host", "127.0.0.1",
            "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--context-window", "128", *flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_url = ""
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        """Wait until it listens, serves metrics and is SERVING."""
        self.port = int(self._wait_for(LISTENING))
        self.metrics_url = f"http://127.0.0.1:{self._wait_for(METRICS_AT)}/metrics"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self._wait_serving()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def _wait_for(self, pattern: re.Pattern[str]) -> str:
        found: list[str] = []

        def logged() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"gpt2-serve exited {self.process.returncode}:\n{self.log()}")
            found.extend(m.group(1) for line in list(self.lines) if (m := pattern.search(line)))
            return bool(found)

        poll(logged, START_TIMEOUT_S, f"a log line matching {pattern.pattern!r}")
        return found[0]

    def _wait_serving(self) -> None:
        assert self.channel is not None
        health = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service="")
        serving = health_pb2.HealthCheckResponse.SERVING
        poll(lambda: health.Check(request, timeout=5).status == serving, START_TIMEOUT_S, "health SERVING")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def samples(self) -> Samples:
        return parse_exposition(self.scrape())

    def stop(self) -> int:
        """SIGTERM (drain), and the exit status."""
        if self.channel is not None:
            self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        return status


@contextmanager
def serve_process(*flags: str) -> Iterator[ServeProcess]:
    server = ServeProcess(flags)
    try:
        server.start()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        if server.process.stderr is not None:
            server.process.stderr.close()
