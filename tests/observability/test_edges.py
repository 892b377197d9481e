"""Edges of the metrics layer: bounded methods and models, crashes, disconnects, cache hits,
request ids from proxies, apps and forks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from gemini_scale import MetricsMiddleware
from gemini_scale.observability.request_id import RequestIds
from gemini_scale.types import Message
from tests.cache.support import call, http_scope
from tests.gateway import build, running

GENERATE = "/v1beta/models/{model}:generateContent"


def samples(registry: CollectorRegistry, family: str) -> list[Any]:
    return [s for m in registry.collect() if m.name == family for s in m.samples]


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


def _app() -> Starlette:
    return Starlette(routes=[Route("/x", _ok, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
                            Route(GENERATE, _ok, methods=["POST"])])


async def test_http_methods_are_bounded() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_app(), registry=registry, access_log=False)
    for i in range(200):
        await call(app, f"M{i:03d}", "/x")
    await call(app, "GET", "/x")
    methods = {s.labels["http_request_method"]
               for s in samples(registry, "http_server_request_duration_seconds")}
    assert methods == {"_OTHER", "GET"}


async def test_refused_requests_cannot_use_up_the_model_labels() -> None:
    registry = CollectorRegistry()

    async def generate(request: Request) -> Response:
        known = request.path_params["model"] == "gemini-2.5-flash"
        return JSONResponse({}, status_code=200 if known else 401)

    routed = Starlette(routes=[Route(GENERATE, generate, methods=["POST"])])
    app = MetricsMiddleware(routed, registry=registry, access_log=False, max_models=3)
    for i in range(20):
        await call(app, "POST", f"/v1beta/models/junk-{i}:generateContent")
    await call(app, "POST", "/v1beta/models/gemini-2.5-flash:generateContent")
    models = {s.labels["gen_ai_request_model"]
              for s in samples(registry, "gen_ai_server_request_duration_seconds")}
    assert models == {"(other)", "gemini-2.5-flash"}


@pytest.mark.parametrize("error", [RuntimeError, TimeoutError])  # TimeoutError is an OSError
async def test_a_crash_is_a_500_with_the_request_id_and_not_a_disconnect(
    error: type[Exception],
) -> None:
    registry = CollectorRegistry()

    async def boom(request: Request) -> Response:
        raise error("the app failed")

    app = MetricsMiddleware(Starlette(routes=[Route("/boom", boom)]), registry=registry,
                            access_log=False)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(error):  # answered here, then re-raised for the server
        await app(http_scope("GET", "/boom"), receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert starts[0]["status"] == 500
    assert [k for k, _ in starts[0]["headers"]].count(b"x-request-id") == 1
    assert registry.get_sample_value("http_server_request_duration_seconds_count", {
        "http_request_method": "GET", "http_route": "/boom", "http_response_status_code": "500",
        "gemini_api_version": "none"}) == 1
    assert not samples(registry, "gemini_scale_client_disconnects")


async def test_a_failing_send_is_a_disconnect() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_app(), registry=registry, access_log=False)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise OSError("client gone")

    with pytest.raises(OSError, match="client gone"):
        await app(http_scope("GET", "/x"), receive, send)
    assert registry.get_sample_value(
        "gemini_scale_client_disconnects_total", {"http_route": "/x"}
    ) == 1


async def test_cache_hits_burn_no_tokens() -> None:
    registry = CollectorRegistry()
    app = build({"GEMINI_SCALE_CACHE_TTL": "60", "GEMINI_SCALE_CACHE_GENERATION": "all"},
                registry=registry)
    body = {"contents": [{"role": "user", "parts": [{"text": "tokens once"}]}]}
    async with running(app) as client:
        first = await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body)
        second = await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body)
    assert "hit" in second.headers["cache-status"]
    prompt = first.json()["usageMetadata"]["promptTokenCount"]
    assert registry.get_sample_value("gemini_scale_tokens_total", {
        "gen_ai_request_model": "gemini-2.5-flash", "tenant": "(none)",
        "gen_ai_token_type": "input"}) == prompt


async def test_request_ids_from_proxies_and_apps() -> None:
    async def upper(request: Request) -> Response:
        return JSONResponse({"seen": request.headers.getlist("x-request-id")},
                            headers={"X-Request-ID": "app-own"})

    app = MetricsMiddleware(Starlette(routes=[Route("/x", upper)]), registry=CollectorRegistry(),
                            access_log=False, trusted_proxies=["127.0.0.0/8"])
    recorded = await call(app, "GET", "/x", headers=[("x-request-id", "client-chosen"),
                                                     ("x-request-id", "proxy-appended-1")])
    ids = [v for k, v in recorded.messages[0]["headers"] if k.lower() == b"x-request-id"]
    assert ids == [b"proxy-appended-1"]
    assert b'"seen":["proxy-appended-1"]' in recorded.body


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_workers_do_not_share_ids() -> None:
    ids = RequestIds()
    ids.new()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id goes to the parent
        os.write(write, ids.new())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert child[:16] != ids.new()[:16]


def test_ids_are_unique_per_instance() -> None:
    a, b = RequestIds(), RequestIds()
    made = {a.new() for _ in range(1000)} | {b.new() for _ in range(1000)}
    assert len(made) == 2000



def _usage(prompt: int, candidates: int) -> dict[str, int]:
    return {"promptTokenCount": prompt, "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates}


def _answer_app(chunks: list[bytes], media: str) -> Starlette:
    """A Gemini generation route whose answer is ``chunks``, one body message each."""

    class Answer:  # an ASGI endpoint (Starlette calls a plain function with a Request)
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", media.encode())]})
            for i, chunk in enumerate(chunks):
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": i < len(chunks) - 1})

    routes = [Route(path, Answer(), methods=["POST"]) for path in (
        GENERATE, "/v1beta/models/{model}:streamGenerateContent")]
    return Starlette(routes=routes)


def _tokens(registry: CollectorRegistry, kind: str) -> float | None:
    return registry.get_sample_value("gemini_scale_tokens_total", {
        "gen_ai_request_model": "gemini-2.5-flash", "tenant": "(none)",
        "gen_ai_token_type": kind})


_ANSWER = json.dumps({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                      "usageMetadata": _usage(4, 9)}).encode()
_SSE = b"".join(b"data: " + json.dumps({"usageMetadata": _usage(4, n)}).encode() + b"\r\n\r\n"
                for n in (1, 5, 9))


@pytest.mark.parametrize(
    ("operation", "chunks", "media"),
    [
        ("generateContent", [_ANSWER], "application/json"),  # one message: the quick path
        ("generateContent", [_ANSWER[:20], _ANSWER[20:]], "application/json"),
        ("generateContent", [_ANSWER, b""], "application/json"),
        ("streamGenerateContent", [_SSE[:30], _SSE[30:70], _SSE[70:]], "text/event-stream"),
        ("streamGenerateContent", [_SSE], "text/event-stream"),  # a stream in one message
    ],
)
async def test_without_a_token_limiter_the_layer_reads_the_usage_itself(
    operation: str, chunks: list[bytes], media: str
) -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_answer_app(chunks, media), registry=registry, access_log=False)
    recorded = await call(app, "POST", f"/v1beta/models/gemini-2.5-flash:{operation}",
                          json_body={})
    assert b"".join(m.get("body", b"") for m in recorded.messages[1:]) == b"".join(chunks)
    assert (_tokens(registry, "input"), _tokens(registry, "output")) == (4, 9)


async def test_a_stream_cut_short_counts_the_usage_seen_so_far() -> None:
    registry = CollectorRegistry()
    events = _SSE.split(b"\r\n\r\n")
    chunks = [events[0] + b"\r\n\r\n", events[1] + b"\r\n\r\n", events[2]]
    app = MetricsMiddleware(_answer_app(chunks, "text/event-stream"), registry=registry,
                            access_log=False)
    await call(app, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
               json_body={}, disconnect_after=2)
    assert (_tokens(registry, "input"), _tokens(registry, "output")) == (4, 5)


async def test_a_cache_hit_burns_no_tokens_without_a_limiter_too() -> None:
    from gemini_scale import CacheMiddleware, MemoryStore
    from gemini_scale.policies import CachePolicy

    registry = CollectorRegistry()
    inner = CacheMiddleware(_answer_app([_ANSWER], "application/json"), store=MemoryStore(),
                            default=CachePolicy(ttl=60, scope="shared", generation="all",
                                                methods=frozenset({"POST"})))
    app = MetricsMiddleware(inner, registry=registry, access_log=False)
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    await call(app, "POST", path, json_body={"contents": []})
    hit = await call(app, "POST", path, json_body={"contents": []})
    assert "hit" in hit.headers["cache-status"]
    assert (_tokens(registry, "input"), _tokens(registry, "output")) == (4, 9)


# -- a client that leaves before the answer, one-shot headers, HEAD ---------------------------


def _requests(registry: CollectorRegistry, route: str, status: str) -> float | None:
    return registry.get_sample_value("http_server_request_duration_seconds_count", {
        "http_request_method": "POST", "http_route": route, "http_response_status_code": status,
        "gemini_api_version": "none"})


async def _leaves_silently(scope: Any, receive: Any, send: Any) -> None:
    """Reads until the client leaves, then returns without answering (no one to answer)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reads_the_body(request: Request) -> Response:
    await request.body()  # raises ClientDisconnect: the upload was cut
    return JSONResponse({"ok": True})


async def _waits(request: Request) -> Response:
    await asyncio.sleep(3600)  # cancelled by the server when the client leaves
    return JSONResponse({"ok": True})


@pytest.mark.parametrize("case", ["silent", "upload_cut", "app_answers_nobody", "cancelled"])
async def test_a_client_gone_before_the_answer_is_a_499_not_a_500(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gemini_scale.access")
    registry = CollectorRegistry()
    routes = [Route("/upload", _reads_the_body, methods=["POST"]),
              Route("/wait", _waits, methods=["POST"])]
    inner: Any = Router(routes=routes)
    if case == "silent":
        inner = _leaves_silently
    elif case == "app_answers_nobody":  # Starlette's error middleware answers a 500 anyway
        inner = Starlette(routes=routes)
    app = MetricsMiddleware(inner, registry=registry)
    route = "(unmatched)" if case == "silent" else "/wait" if case == "cancelled" else "/upload"
    messages = iter([{"type": "http.request", "body": b'{"a":', "more_body": True},
                     {"type": "http.disconnect"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages) if case != "cancelled" else await asyncio.Event().wait()

    async def send(message: Message) -> None:
        sent.append(message)

    task = asyncio.create_task(app(http_scope("POST", route), receive, send))
    if case == "cancelled":
        await asyncio.sleep(0.05)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ClientDisconnect):
        await task
    if case != "app_answers_nobody":  # no 500 from this layer
        assert not [m for m in sent if m.get("status") == 500]
    assert _requests(registry, route, "499") == 1
    assert _requests(registry, route, "500") is None
    assert registry.get_sample_value(
        "gemini_scale_client_disconnects_total", {"http_route": route}) == 1
    access = [r.__dict__["access"] for r in caplog.records if r.name == "gemini_scale.access"]
    assert (access[-1]["status"], access[-1]["client_disconnected"]) == (499, True)


async def test_headers_in_a_one_shot_iterable_are_all_sent() -> None:
    async def answer(scope: Any, receive: Any, send: Any) -> None:
        headers = {b"content-type": b"application/json", b"cache-control": b"no-store"}
        await send({"type": "http.response.start", "status": 200,
                    "headers": ((k, v) for k, v in headers.items())})
        await send({"type": "http.response.body", "body": b"{}"})

    app = MetricsMiddleware(answer, registry=CollectorRegistry(), access_log=False)
    recorded = await call(app, "GET", "/x")
    names = [k for k, _ in recorded.messages[0]["headers"]]
    assert names == [b"content-type", b"cache-control", b"x-request-id"]


async def test_a_head_request_records_no_body_bytes_nor_a_first_byte(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="gemini_scale.access")
    registry = CollectorRegistry()
    head = Starlette(routes=[Route("/x", _ok, methods=["GET", "HEAD"])])
    await call(MetricsMiddleware(head, registry=registry), "HEAD", "/x")
    access = [r.__dict__["access"] for r in caplog.records if r.name == "gemini_scale.access"]
    assert access[-1]["bytes"] == 0
    assert "ttfb_ms" not in access[-1]
    assert registry.get_sample_value("gemini_scale_time_to_first_byte_seconds_count",
                                      {"http_request_method": "HEAD", "http_route": "/x"}) == 0


async def test_a_misconfigured_apps_500_is_observed_like_any_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the app fails the audit (a cache mark under a ``Host`` route, which no layer
    could enforce), every request is a 500; it still carries a request id and is counted
    and logged."""
    from starlette.routing import Host

    from gemini_scale import CacheMiddleware, cache

    caplog.set_level("INFO", logger="gemini_scale.access")
    registry = CollectorRegistry()
    hosted = Router(routes=[Route("/c", cache(ttl=4)(_ok))])
    app = MetricsMiddleware(
        CacheMiddleware(Starlette(routes=[Host("api.example", app=hosted)])), registry=registry
    )
    recorded = await call(app, "GET", "/c")
    start = recorded.messages[0]
    assert start["status"] == 500
    ids = [v for k, v in start["headers"] if k == b"x-request-id"]
    assert len(ids) == 1
    assert json.loads(recorded.body)["error"]["status"] == "INTERNAL"
    assert registry.get_sample_value("http_server_request_duration_seconds_count", {
        "http_request_method": "GET", "http_route": "(unmatched)",
        "http_response_status_code": "500", "gemini_api_version": "none"}) == 1
    [record] = [r for r in caplog.records if r.name == "gemini_scale.access"]
    assert record.access["request_id"] == ids[0].decode()  # type: ignore[attr-defined]
    assert record.access["status"] == 500  # type: ignore[attr-defined]
