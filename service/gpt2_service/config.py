"""Every setting of ``gpt2-serve``: frozen dataclasses whose fields all have a default and a
one-line description, and the flags (with their ``GPT2_SERVE_*`` environment twins) generated
from them, so ``--help``, the docs table and this file cannot disagree. No torch, no gRPC.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
C = TypeVar("C")

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # weights.DTYPES maps each to its torch dtype
WEIGHT_FORMAT_NAMES = ("float32", "float16", "int8")  # kernels.WEIGHT_FORMATS


def _opt(default: T, help: str) -> T:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: str = _opt("random:gpt2", "model: random:<size>, a checkpoint directory, or a hub id in the local HF cache")
    random_fallback: bool = _opt(
        True, "serve random weights (loudly) when --model cannot be loaded, instead of exiting"
    )
    dtype: str = _opt("float32", "weights and KV-cache dtype: float32, bfloat16 or float16")
    weights: str = _opt(
        "float32", "weight storage of the matrix products (CPU, --dtype float32; arithmetic stays float32): "
        "float32 (exact), float16 or int8 (faster, approximate; see docs/performance.md)"
    )  # fmt: skip
    device: str = _opt("cpu", "torch device, e.g. cpu or cuda")
    max_batch_size: int = _opt(32, "most sequences decoded together in one step")
    max_queue_size: int = _opt(256, "most requests waiting for a batch slot; beyond it requests are rejected")
    kv_cache_slots: int = _opt(0, "KV-cache slots (one per running sequence); 0 = max_batch_size")
    context_window: int = _opt(0, "positions per sequence; 0 = the model's n_positions (1024 for GPT-2)")
    max_prefill_tokens: int = _opt(256, "prompt tokens prefilled per engine step (bounds the stall of running streams)")
    context_shift_keep: int = _opt(
        0, "tokens kept when a generation shifts its window; 0 = three quarters of the window"
    )
    max_new_tokens_limit: int = _opt(2048, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = _opt(64, "max_new_tokens of a request that does not set it")
    prefix_cache: bool = _opt(
        True, "reuse the keys and values of a prompt prefix that a KV-cache slot already holds (another request's "
        "same tokens) instead of computing them; --no-prefix-cache computes every prompt"
    )  # fmt: skip
    prefix_cache_across_tenants: bool = _opt(
        True, "let a tenant's request reuse a prefix another tenant's request computed (the model is the same and "
        "no data leaves the cache, but timing reveals that the prefix was seen); --no-prefix-cache-across-tenants "
        "keeps each tenant's prefixes to itself"
    )  # fmt: skip
    prefix_block_tokens: int = _opt(
        16, "prompt tokens per block of the prefix cache (prefixes are reused in whole blocks)"
    )
    max_choices: int = _opt(
        16, "largest GenerateRequest.n (completions of one prompt); each completion holds a batch place and a "
        "KV-cache slot, and counts against --max-queue-size"
    )  # fmt: skip
    num_threads: int = _opt(0, "torch intra-op threads of the engine thread; 0 = torch's default (the cores)")
    batch_invariant: bool = _opt(
        True,
        "bitwise the same tokens and log-probabilities for a seeded request whatever shares its batch "
        "(CPU, --dtype float32, every --weights format); --no-batch-invariant trades that for a little speed",
    )
    max_call_share: float = _opt(
        0.5, "largest share of --max-batch-size that one call (a GenerateBatch's items) may hold while other "
        "requests wait; 1 = no limit"
    )  # fmt: skip
    max_queued_per_tenant: int = _opt(
        64, "most requests one tenant may have waiting; beyond it that tenant's requests get RESOURCE_EXHAUSTED"
    )
    preemption: bool = _opt(
        True, "a waiting request of a higher priority, or of a tenant below its fair share of the batch, preempts "
        "the newest running sequence of the lowest priority (its keys and values are recomputed when it resumes)"
    )  # fmt: skip
    deadline_admission: bool = _opt(
        True, "refuse at once (RESOURCE_EXHAUSTED with RetryInfo) a request whose deadline the engine estimates "
        "it cannot meet with its first token, instead of queueing it to die"
    )  # fmt: skip
    stream_buffer_tokens: int = _opt(
        256, "tokens a stream may hold generated but unread; beyond it its sequence is paused (out of the batch) "
        "until the reader catches up"
    )  # fmt: skip
    stream_idle_timeout: float = _opt(
        60.0, "seconds a paused stream may go unread before it is cancelled with RESOURCE_EXHAUSTED; 0 = never"
    )
    introspection_share: float = _opt(
        0.25, "largest share of the engine thread's time that Introspection forward passes take while "
        "generation has work"
    )  # fmt: skip
    stage_timing: bool = _opt(True, "time embedding/attention/mlp/lm_head/sampling per step (CPU only)")
    seed: int = _opt(0, "seed of the random weights of random:<size> models")

    def resolved_slots(self) -> int:
        return self.kv_cache_slots or self.max_batch_size


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings (the engine's are in EngineConfig); flags are made from these."""

    host: str = _opt("0.0.0.0", "address to listen on ([::] for IPv6 too)")
    port: int = _opt(50051, "port to listen on (0 = pick a free one)")
    grace_period: float = _opt(30.0, "seconds running requests get to finish after SIGTERM/SIGINT")
    max_message_bytes: int = _opt(16 * 1024 * 1024, "largest gRPC message received or sent, in bytes")
    max_batch_requests: int = _opt(64, "most requests in one GenerateBatch call")
    max_introspection_bytes: int = _opt(
        16 * 1024 * 1024,
        "largest Introspection response, in bytes; bigger requests get INVALID_ARGUMENT naming what to narrow "
        "(capped at --max-message-bytes less 64 KiB of framing)",
    )
    max_model_rpcs: int = _opt(
        2, "most Introspection model RPCs (Embed, Attention, HiddenStates, PredictNext, Trace) in flight; "
        "beyond it they get RESOURCE_EXHAUSTED"
    )  # fmt: skip
    reflection: bool = _opt(True, "serve gRPC server reflection (for grpcurl and other generic clients)")
    max_connection_age: float = _opt(
        0.0, "seconds after which a client connection is closed with a GOAWAY (gRPC adds +-10 percent jitter), "
        "so clients re-resolve and spread over new replicas; 0 = never (the Kubernetes manifests set 300)"
    )  # fmt: skip
    max_connection_age_grace: float = _opt(
        60.0, "seconds the calls running on a connection at its max age get to finish before it is closed; 0 = no limit"
    )
    tls_cert: str = _opt("", "PEM certificate chain: serve the gRPC port over TLS (with --tls-key); empty = plaintext")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", "PEM CA bundle: mutual TLS, clients must present a certificate signed by it")
    tls_require_client_eku: bool = _opt(
        False, "with --tls-client-ca: also refuse client certificates whose extended key usage lacks clientAuth "
        "(e.g. a server certificate from the same CA)"
    )  # fmt: skip
    auth_token_file: str = _opt(
        "", "file of accepted bearer tokens, one per line: every call but health and reflection must send "
        "'authorization: Bearer <token>'; empty = no token auth"
    )  # fmt: skip
    health_port: int = _opt(
        0, "also serve grpc.health.v1.Health alone, in plaintext, on this port (kubelet probes under TLS); 0 = off"
    )
    metrics_host: str = _opt("0.0.0.0", "address the Prometheus /metrics endpoint listens on")
    metrics_port: int = _opt(
        9090, "port of the Prometheus /metrics endpoint (plain HTTP); 0 = pick a free one, -1 = no metrics"
    )
    log_format: str = _opt("text", "log format: text or json (one JSON object per line)")
    log_level: str = _opt("info", "log level: debug, info, warning or error")
    log_prompts: bool = _opt(False, "put each request's prompt in its log line (prompts may hold private data)")
    trace: bool = _opt(
        False, "export OpenTelemetry traces of every RPC (OTLP; configured by the standard OTEL_* variables, "
        "e.g. OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER; see docs/tracing.md)"
    )  # fmt: skip
    trace_text: bool = _opt(
        False, "with --trace: put the prompt and the output text in span attributes (they may hold private data)"
    )


# -- flags ---------------------------------------------------------------------------------------

ENV_PREFIX = "GPT2_SERVE_"
CHOICES: dict[str, Sequence[str]] = {
    "dtype": DTYPE_NAMES,
    "weights": WEIGHT_FORMAT_NAMES,
    "log_format": ("text", "json"),
    "log_level": ("debug", "info", "warning", "error"),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _from_env(raw: str, kind: type, name: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"{name}={raw!r} is not a boolean (use true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def add_config_flags(parser: argparse.ArgumentParser, cls: type[Any], title: str, environ: Mapping[str, str]) -> None:
    """One flag per dataclass field: ``--field-name``, typed, help from ``metadata["help"]``,
    default from ``GPT2_SERVE_FIELD_NAME`` if set, else the field's default."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        env = env_name(f.name)
        default = f.default
        if env in environ:
            try:
                default = _from_env(environ[env], kind, env)
            except ValueError as exc:
                parser.error(str(exc))
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env}]"
        if kind is bool:  # --flag / --no-flag
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=f.name, type=kind, default=default, choices=CHOICES.get(f.name),
                metavar=f.name.upper(), help=help_text,
            )  # fmt: skip


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser of ``gpt2-serve``: one flag per field of EngineConfig and ServerConfig, defaults
    from ``environ`` (the GPT2_SERVE_* twins) where set."""
    parser = argparse.ArgumentParser(
        prog="gpt2-serve",
        description="Serve GPT-2 over gRPC (gpt2.v1.TextGeneration and Introspection, health, reflection).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser, EngineConfig, "engine", environ)
    add_config_flags(parser, ServerConfig, "server", environ)
    return parser
