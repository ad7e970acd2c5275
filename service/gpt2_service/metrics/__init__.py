"""Prometheus metrics of the service (prefix ``gpt2_``), in a registry of their own, served on their
own HTTP port: ``registry.Metrics`` (what the server creates), ``recorder.EngineRecorder`` (the
engine's events), ``series`` (the numbers and their families)."""

from gpt2_service.metrics.recorder import EngineRecorder
from gpt2_service.metrics.registry import Metrics
from gpt2_service.metrics.series import REJECT_REASONS, STAGES

__all__ = ["REJECT_REASONS", "STAGES", "EngineRecorder", "Metrics"]
