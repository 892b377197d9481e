"""Monitoring: ``MetricsMiddleware`` (request ids, timing, Prometheus metrics, access logs),
OpenTelemetry tracing and usage anomalies.

Names resolve on first use, so that the layers that leave facts for the metrics layer (and
import :mod:`gemini_scale.observability.tracing`) do not import Prometheus.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from gemini_scale.observability.anomaly import Anomaly, UsageAnomalyDetector
    from gemini_scale.observability.logs import (
        ACCESS_LOGGER,
        JSONFormatter,
        KeyValueFormatter,
        RequestIdFilter,
        configure_logging,
        current_request_id,
    )
    from gemini_scale.observability.metrics import metrics_body
    from gemini_scale.observability.middleware import MetricsMiddleware
    from gemini_scale.observability.tracing import disable_tracing, enable_tracing

_LAZY = {
    "ACCESS_LOGGER": "gemini_scale.observability.logs",
    "Anomaly": "gemini_scale.observability.anomaly",
    "JSONFormatter": "gemini_scale.observability.logs",
    "KeyValueFormatter": "gemini_scale.observability.logs",
    "MetricsMiddleware": "gemini_scale.observability.middleware",
    "RequestIdFilter": "gemini_scale.observability.logs",
    "UsageAnomalyDetector": "gemini_scale.observability.anomaly",
    "configure_logging": "gemini_scale.observability.logs",
    "current_request_id": "gemini_scale.observability.logs",
    "disable_tracing": "gemini_scale.observability.tracing",
    "enable_tracing": "gemini_scale.observability.tracing",
    "metrics_body": "gemini_scale.observability.metrics",
}

__all__ = [
    "ACCESS_LOGGER",
    "Anomaly",
    "JSONFormatter",
    "KeyValueFormatter",
    "MetricsMiddleware",
    "RequestIdFilter",
    "UsageAnomalyDetector",
    "configure_logging",
    "current_request_id",
    "disable_tracing",
    "enable_tracing",
    "metrics_body",
]


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
