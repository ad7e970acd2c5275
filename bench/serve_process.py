"""``gpt2-serve`` as a subprocess for the benchmarks that need a server of its own (soak.py,
contention.py): free gRPC and metrics ports on 127.0.0.1, read from its log, the last log lines
kept (and optionally copied to a file), its RSS, and a SIGTERM stop."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpt2_client import Client, GPT2Error

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
METRICS_AT = re.compile(r"metrics on http://\S+:(\d+)/metrics")
MB = 1_000_000


class ServeProcess:
    def __init__(
        self, model: str, flags: list[str], env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        entry = Path(sys.executable).with_name("gpt2-serve")
        command = [str(entry)] if entry.exists() else [sys.executable, "-m", "gpt2_service"]
        command += ["--model", model, "--host", "127.0.0.1", "--port", "0"]
        command += ["--metrics-host", "127.0.0.1", "--metrics-port", "0", *flags]
        self.flags = flags
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.lines: collections.deque[str] = collections.deque(maxlen=300)
        self._log = log.open("w") if log else None
        self._found: dict[str, str] = {}
        self._ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._log:
                self._log.write(line)
                self._log.flush()
            for name, pattern in (("port", LISTENING), ("metrics", METRICS_AT)):
                if name not in self._found and (match := pattern.search(line)):
                    with self._ready:
                        self._found[name] = match.group(1)
                        self._ready.notify_all()

    def wait_listening(self, timeout: float = 180.0) -> tuple[str, str]:
        """The gRPC target and the metrics URL, once both are logged."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while len(self._found) < 2:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gpt2-serve did not start:\n" + "\n".join(self.lines))
                self._ready.wait(0.2)
        return f"127.0.0.1:{self._found['port']}", f"http://127.0.0.1:{self._found['metrics']}/metrics"

    def wait_serving(self, target: str, token: str | None = None, timeout: float = 300.0) -> None:
        """Return once the health service says SERVING (the model is loaded and warm)."""
        deadline = time.monotonic() + timeout
        with Client(target, timeout=5, token=token) as client:
            while True:
                try:
                    if client.health().name == "SERVING":
                        return
                except GPT2Error:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gpt2-serve not SERVING:\n" + "\n".join(self.lines))
                time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
        raise KeyError("VmRSS")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 60 s); the exit status, or None when it had to be killed."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
