"""OpenTelemetry tracing: a server span per request with child spans for authentication,
rate limits, the cache and the upstream call, and W3C ``traceparent`` sent upstream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from example_app.standin import ReceivedRequest, create_standin
from gemini_scale.observability import disable_tracing, enable_tracing
from tests.gateway import build, running

BODY = {"contents": [{"role": "user", "parts": [{"text": "trace me"}]}]}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    enable_tracing(provider)
    try:
        yield exporter
    finally:
        disable_tracing()


async def test_spans_for_every_layer_and_traceparent_upstream(
    exporter: InMemorySpanExporter,
) -> None:
    received: list[ReceivedRequest] = []
    app = build({"GEMINI_SCALE_CACHE_TTL": "60",
                 "GEMINI_SCALE_TRUSTED_PROXIES": "127.0.0.1/32"},  # the test client's address
                standin=create_standin(received=received), registry=CollectorRegistry())
    async with running(app) as client:
        exporter.clear()
        incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        response = await client.post(
            "/v1/models/gemini-2.5-flash:countTokens", json=BODY,
            headers={"traceparent": incoming},
        )
        assert response.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    server = spans["POST /v1beta/models/{model}:countTokens"]  # the head route's template
    assert server.kind.name == "SERVER"
    assert server.attributes["http.response.status_code"] == 200
    trace_id = server.context.trace_id
    assert format(trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"  # continued
    for name in ("gemini_scale.auth", "gemini_scale.rate_limit", "gemini_scale.cache",
                 "gemini_scale.upstream"):
        assert name in spans, sorted(spans)
        assert spans[name].context.trace_id == trace_id
    assert spans["gemini_scale.upstream"].kind.name == "CLIENT"
    upstream = received[-1].header("traceparent")
    assert upstream is not None
    assert upstream.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert upstream.split("-")[2] == format(spans["gemini_scale.upstream"].context.span_id, "016x")


async def test_without_tracing_nothing_is_sent_upstream() -> None:
    received: list[ReceivedRequest] = []
    app = build(standin=create_standin(received=received), registry=CollectorRegistry())
    async with running(app) as client:
        await client.post("/v1beta/models/gemini-2.5-flash:countTokens", json=BODY,
                          headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                                  "b7ad6b7169203331-01"})
    assert received[-1].header("traceparent") is None


async def test_a_5xx_answer_is_an_error_span_and_a_4xx_is_not(
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry.trace import StatusCode
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from gemini_scale import MetricsMiddleware
    from tests.cache.support import call

    async def status(request: Request) -> Response:
        return JSONResponse({}, status_code=int(request.path_params["code"]))

    app = MetricsMiddleware(Starlette(routes=[Route("/{code:int}", status)]),
                            registry=CollectorRegistry(), access_log=False)
    for code in ("503", "404"):
        await call(app, "GET", f"/{code}")
    statuses = {span.attributes["http.response.status_code"]: span.status.status_code
                for span in exporter.get_finished_spans() if span.kind.name == "SERVER"}
    assert statuses == {503: StatusCode.ERROR, 404: StatusCode.UNSET}


@pytest.mark.parametrize("trusted", [True, False])
async def test_only_a_trusted_proxys_trace_is_continued(
    exporter: InMemorySpanExporter, trusted: bool
) -> None:
    # Any other client's traceparent would choose the trace id and force (or suppress)
    # sampling of its requests, whatever the operator's sampler says.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from gemini_scale import MetricsMiddleware
    from tests.cache.support import call

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    app = MetricsMiddleware(Starlette(routes=[Route("/x", ok)]), registry=CollectorRegistry(),
                            access_log=False,
                            trusted_proxies=["127.0.0.1/32"] if trusted else [])
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await call(app, "GET", "/x", headers={"traceparent": incoming})  # from 127.0.0.1
    [server] = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    continued = format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert continued is trusted
    assert (server.parent is not None) is trusted
