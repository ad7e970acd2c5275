"""Prometheus metrics of the service, in a registry of their own, served on their own HTTP port.

Engine-side series (per step and per finished request) are plain numbers updated on the engine
thread under one lock per event and turned into metric families only at scrape time, so the
decode loop pays a few additions per step; gauges read ``engine.stats`` at scrape time and cost
the loop nothing. API-side series (RPCs, rejections, cancellations) use prometheus_client's
thread-safe counters. This module is not the request log; that belongs to the gRPC layer.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Info, generate_latest

from gpt2_service import __version__
from gpt2_service.metrics.recorder import EngineRecorder
from gpt2_service.metrics.series import REJECT_REASONS

if TYPE_CHECKING:
    from gpt2_service.engine.frontend import Engine
    from gpt2_service.model.weights import LoadedModel


class Metrics:
    """The service's metrics. Engine-side series come from ``attach(engine)``; the gRPC layer
    reports each RPC's final status code, rejections and cancellations through ``observe_*``.
    Every method is thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recorder = EngineRecorder()
        self.registry.register(self.recorder)
        self._requests = Counter(
            "gpt2_requests_total",
            "RPCs handled, by method and final gRPC status code.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "gpt2_requests_rejected_total",
            "Requests refused before generation, by reason: " + ", ".join(REJECT_REASONS) + ".",
            ["reason"],
            registry=self.registry,
        )
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        self._cancelled = Counter(
            "gpt2_requests_cancelled_total",
            "Requests the client cancelled before they finished.",
            registry=self.registry,
        )
        self._model = Info("gpt2_model", "The model being served.", registry=self.registry)

    def attach(self, engine: Engine) -> None:
        """Record the engine's steps and finished requests, and read its gauges at scrape time."""
        self.recorder.attach(engine)

    def set_model_info(self, loaded: LoadedModel, dtype: str, device: str, weights: str, batch_invariant: bool) -> None:
        self._model.info(
            {
                "name": loaded.name,
                "source": loaded.source,
                "random_weights": "true" if loaded.random_weights else "false",
                "dtype": dtype,
                "device": device,
                "weights": weights,
                "batch_invariant": "true" if batch_invariant else "false",
                "version": __version__,
            }
        )

    def observe_rpc(self, rpc: str, code: str) -> None:
        """One finished RPC and its final status code name, e.g. ``("Generate", "OK")``."""
        self._requests.labels(rpc, code).inc()

    def observe_rejected(self, reason: str) -> None:
        """A request refused before generation; ``reason`` is one of ``REJECT_REASONS``."""
        self._rejected.labels(reason).inc()

    def observe_cancelled(self) -> None:
        self._cancelled.inc()

    def start_http_server(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks one: ``server.server_port``) from a
        daemon thread. Stop with ``server.shutdown(); server.server_close()``."""
        return prometheus_client.start_http_server(port, addr=host, registry=self.registry)

    def exposition(self) -> bytes:
        """The text exposition format, as served at ``/metrics``."""
        return generate_latest(self.registry)
