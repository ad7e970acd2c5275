"""``gpt2-serve`` (also ``python -m gpt2_service``): the process's entry point: flags, logging,
and the process's lifecycle. Not the gRPC server itself (api/server.py).

Flags come from config.py (generated from the fields of ``EngineConfig`` and ``ServerConfig``;
each has an environment twin ``GPT2_SERVE_<FLAG>`` that replaces its default). SIGTERM or SIGINT drains the server (see api/server.py) and the process
exits 0; a second signal cuts the grace period short. Prometheus metrics (metrics/) are served
on their own HTTP port from the start; the engine's series appear once the model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from gpt2_service.api.logs import configure_logging, log_fields
from gpt2_service.config import EngineConfig, ServerConfig, build_parser, config_from_args

# torch, gRPC and the rest are imported once the flags are parsed: `gpt2-serve --help` and a bad
# flag answer at once (0.2 s, not the 2-7 s those imports take)
if TYPE_CHECKING:
    from gpt2_service.engine.frontend import Engine
    from gpt2_service.metrics import Metrics

log = logging.getLogger("gpt2_service.main")

# Flat memory: oneDNN and ideep (its wrapper in torch) keep up to 1024 compiled matrix products
# each, one per input shape, and every batch size or prompt length is a new shape; the 30-minute
# soak grew +62.5 MB/minute with those defaults and -0.05 MB/minute with these (bench/README.md,
# "Soak"). deploy/Dockerfile sets the same; the environment wins.
PRIMITIVE_CACHES = {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; the exit status (1 if the model cannot be loaded)."""
    # torch, gRPC and the rest are imported here, before the signal handlers are installed: imported
    # after them (in _serve_until), streams pinned to a SIGTERMed server hung through its whole
    # grace period (tests/test_replicas.py); the mechanism was not pinned down
    import gpt2_service.api.server
    import gpt2_service.engine.frontend
    import gpt2_service.metrics
    import gpt2_service.model.weights  # noqa: F401
    from gpt2_service.engine.threads import confine_torch_to_the_engine

    loop = asyncio.get_running_loop()
    confine_torch_to_the_engine(loop)  # before the model loads: see engine/threads.py
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: stopping without waiting for running requests", signal.Signals(signum).name)
            force.set()
        else:
            log.info("%s received: draining", signal.Signals(signum).name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _serve_until(stop, force, engine_config, server_config)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve_until(
    stop: asyncio.Event, force: asyncio.Event, engine_config: EngineConfig, server_config: ServerConfig
) -> int:
    from gpt2_service.api.server import GenerationServer
    from gpt2_service.engine.frontend import Engine
    from gpt2_service.errors import ModelLoadError
    from gpt2_service.metrics import Metrics
    from gpt2_service.model.weights import load_model

    metrics = Metrics() if server_config.metrics_port >= 0 else None
    provider = None
    if server_config.trace:
        from gpt2_service.api.tracing import tracer_provider_from_env

        try:
            provider = tracer_provider_from_env()
        except ValueError as exc:
            log.error("cannot trace: %s", exc)
            return 1
    server = GenerationServer(server_config, metrics=metrics, tracer_provider=provider)
    port = await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", server_config.host, port)
    try:
        metrics_http = _start_metrics_http(metrics, server_config)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", server_config.metrics_host, server_config.metrics_port, exc)
        await server.stop()
        return 1
    try:
        loaded = await asyncio.to_thread(
            load_model, engine_config.model, dtype=engine_config.dtype, device=engine_config.device,
            allow_random_fallback=engine_config.random_fallback, seed=engine_config.seed,
        )  # fmt: skip
    except ModelLoadError as exc:
        log.error("cannot load model %r: %s", engine_config.model, exc)
        await server.stop()
        _stop_metrics_http(metrics_http)
        return 1
    try:
        engine = Engine(loaded, engine_config)
    except ValueError as exc:  # settings the model cannot run with, e.g. --weights int8 on a GPU
        log.error("cannot start the engine: %s", exc)
        await server.stop()
        _stop_metrics_http(metrics_http)
        return 1
    if metrics is not None:
        metrics.set_model_info(
            loaded, engine_config.dtype, str(engine.runner.device), engine_config.weights, engine.batch_invariant
        )
        metrics.attach(engine)  # before the engine's first step
    await engine.start()
    _log_model(engine, server_config)
    if loaded.random_weights:
        log.warning("serving RANDOM WEIGHTS (%s): generated text is meaningless", loaded.name)
    if not stop.is_set():
        await server.attach(engine)
    await stop.wait()
    await server.drain(server_config.grace_period, force)
    await engine.shutdown()
    _stop_metrics_http(metrics_http)
    if provider is not None:
        await asyncio.to_thread(provider.shutdown)  # export the spans still buffered
    log.info("stopped")
    return 0


MetricsHttp = tuple[WSGIServer, threading.Thread]


def _start_metrics_http(metrics: Metrics | None, config: ServerConfig) -> MetricsHttp | None:
    if metrics is None:
        log.info("metrics: off (--metrics-port %d)", config.metrics_port)
        return None
    http = metrics.start_http_server(config.metrics_host, config.metrics_port)
    log.info("metrics on http://%s:%d/metrics", config.metrics_host, http[0].server_port)
    return http


def _stop_metrics_http(http: MetricsHttp | None) -> None:
    if http is not None:
        server, thread = http
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _log_model(engine: Engine, server_config: ServerConfig) -> None:
    """What an operator checks first: which weights, on what, and the budget and limits."""
    loaded, config, stats = engine.loaded, engine.config, engine.stats
    model = {
        "model": loaded.name,
        "source": loaded.source,
        "random_weights": loaded.random_weights,
        "dtype": config.dtype,
        "device": str(engine.runner.device),
        "parameters": loaded.model.parameter_counts()["total"],
        "context_window": engine.context_window,
        "engine_threads": engine.runner.num_threads,
        "weights": config.weights,
        "batch_invariant": engine.batch_invariant,
    }
    log_fields(log, logging.INFO, "model loaded", model)
    limits = {
        "kv_cache_slots": stats.kv_cache_slots,
        "kv_cache_bytes": stats.kv_cache_bytes,
        "kv_cache_bytes_per_slot": stats.kv_cache_bytes_per_slot,
        "max_batch_size": config.max_batch_size,
        "max_queue_size": config.max_queue_size,
        "max_prefill_tokens": config.max_prefill_tokens,
        "max_new_tokens_limit": config.max_new_tokens_limit,
        "default_max_new_tokens": config.default_max_new_tokens,
        "max_batch_requests": server_config.max_batch_requests,
        "max_message_bytes": server_config.max_message_bytes,
    }
    log_fields(log, logging.INFO, "KV-cache budget and limits", limits)


def check_server_config(parser: argparse.ArgumentParser, config: ServerConfig) -> None:
    """Refuse flags that cannot work before anything starts: one line on stderr, exit 2."""
    from gpt2_service.api.auth import SecurityConfigError, load_security

    try:
        # The server reads the files again when it starts; this is only to fail early and plainly.
        load_security(config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_token_file)
        if config.tls_require_client_eku and not config.tls_client_ca:
            raise SecurityConfigError("--tls-require-client-eku needs --tls-client-ca (mutual TLS)")
        if config.health_port and config.health_port == config.port:
            raise SecurityConfigError(f"--health-port {config.health_port} must differ from --port")
    except SecurityConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    engine_config = config_from_args(EngineConfig, args)
    server_config = config_from_args(ServerConfig, args)
    check_server_config(parser, server_config)
    configure_logging(server_config.log_format, server_config.log_level)
    log.info("engine config: %s", engine_config)
    log.info("server config: %s", server_config)
    for name, value in PRIMITIVE_CACHES.items():  # read by oneDNN and ideep at their first matrix product
        os.environ.setdefault(name, value)
    status = asyncio.run(serve(engine_config, server_config))
    # Drained and stopped: exit now. Tearing down the interpreter (torch, gRPC and the model's
    # memory) takes seconds and does nothing a restarting pod needs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
