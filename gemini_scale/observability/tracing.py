"""OpenTelemetry tracing, when the ``otel`` extra is installed and tracing is turned on.

Off (the default) it costs one ``None`` check per layer. On, ``MetricsMiddleware`` opens a
server span per request (continuing an incoming W3C ``traceparent``), every gemini-scale
layer opens a child span around its work (authentication, rate limit, cache, versions), and
``GeminiUpstream`` opens a client span around the upstream call and sends ``traceparent``
upstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["disable_tracing", "enable_tracing", "inject", "span", "tracer"]

class _State:
    tracer: Any = None


_state = _State()


def tracer() -> Any:
    """The OpenTelemetry tracer when tracing is on, else ``None``."""
    return _state.tracer


def enable_tracing(tracer_provider: Any = None) -> None:
    """Turn tracing on, with ``tracer_provider`` or OpenTelemetry's global one. Raises
    ``ImportError`` without the ``otel`` extra (``pip install gemini-scale[otel]``)."""
    from opentelemetry import trace

    provider = tracer_provider or trace.get_tracer_provider()
    _state.tracer = provider.get_tracer("gemini_scale")


def disable_tracing() -> None:
    """Turn tracing off."""
    _state.tracer = None


@contextlib.contextmanager
def span(name: str, *, kind: str = "INTERNAL", **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` around the block (a no-op when tracing is off)."""
    current = _state.tracer
    if current is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with current.start_as_current_span(
        name, kind=getattr(SpanKind, kind), attributes=attributes or None
    ) as opened:
        yield opened


def server_span(name: str, headers: list[tuple[bytes, bytes]], **attributes: Any) -> Any:
    """The context manager of a request's server span, continuing the W3C trace context
    of ``headers`` (``None`` when tracing is off)."""
    current = _state.tracer
    if current is None:
        return None
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
               if k in (b"traceparent", b"tracestate", b"baggage")}
    return current.start_as_current_span(
        name, context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes or None
    )


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current trace context (``traceparent``) to outgoing ``headers``."""
    if _state.tracer is not None:
        from opentelemetry.propagate import inject as otel_inject

        otel_inject(headers)
