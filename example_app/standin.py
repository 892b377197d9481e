"""The offline Gemini stand-in: a deterministic upstream in the exact Gemini wire format.

:func:`create_standin` builds a Starlette app that answers like
``generativelanguage.googleapis.com`` (research/gemini-api.md §1, §3, §6) under ``/v1``,
``/v1beta`` and ``/v1alpha``, so the demo gateway, the tests and the official
``google-genai`` SDK work with no network:

* ``GET /{v}/models`` (``pageSize``/``pageToken`` paging) and ``GET /{v}/models/{model}``;
* ``POST /{v}/models/{model}:generateContent``, ``:streamGenerateContent`` (SSE with
  ``alt=sse``: ``data: <json>\\r\\n\\r\\n`` events in Google's ``", "``/``": "`` separators,
  nothing else; without it one streamed, pretty-printed JSON array), ``:countTokens``
  (``contents`` or ``generateContentRequest``), ``:embedContent``, ``:batchEmbedContents``.

Determinism: the reply is a few words from a fixed list chosen by SHA-256 of the model id and
the prompt text (system instruction included), so the same request gives the same bytes;
``responseId`` is derived from the same hash. Generation settings other than
``maxOutputTokens`` and ``candidateCount`` do not change the text.

Token counts (documented estimate, not Gemini's tokenizer): a text part costs
``ceil(len(text) / 4)`` tokens, an ``inlineData``/``fileData`` part 258 (Gemini's per-image
figure), any other part or the ``tools`` list ``ceil(len(json) / 4)``. A reply stops at the
last whole word within ``maxOutputTokens`` (``finishReason: MAX_TOKENS``).

Embeddings are unit vectors (3072 values unless ``outputDimensionality``) derived from the
text, the model and the task type.

Success is status 200 exactly (the SDK rejects anything else); errors are Google's envelope,
pretty-printed, with Google's messages. Both camelCase and snake_case request fields are
accepted, and integral floats in integer fields (``"candidateCount": 1.0``).

Test hooks: ``chunk_delay`` (seconds between stream chunks), ``latency`` (seconds before
answering), ``gate`` (a :class:`StreamGate` that holds streams mid-way and records how they
ended), ``fail_with`` (a status, or a callable per request, for Google's canned errors; kept
on ``app.state.fail_with`` so a test may change it), ``api_keys`` (require one of these keys)
and ``received`` (a list the stand-in appends every request it saw to).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gemini_scale.errors import error_body, reason_phrase

__all__ = [
    "API_VERSIONS",
    "DEFAULT_MODELS",
    "FailWith",
    "ReceivedRequest",
    "StreamGate",
    "create_standin",
    "estimate_tokens",
]

#: API versions served, all with the same surface.
API_VERSIONS = ("v1", "v1beta", "v1alpha")

_GENERATE_METHODS = [
    "generateContent",
    "countTokens",
    "createCachedContent",
    "batchGenerateContent",
]

#: The models listed by default: current Gemini models with their published ``Model`` fields.
DEFAULT_MODELS: tuple[Mapping[str, Any], ...] = (
    {
        "name": "models/gemini-2.5-flash",
        "version": "001",
        "displayName": "Gemini 2.5 Flash",
        "description": "Stable version of Gemini 2.5 Flash, our mid-size multimodal model that "
        "supports up to 1 million tokens, released in June of 2025.",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": _GENERATE_METHODS,
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    },
    {
        "name": "models/gemini-2.5-pro",
        "version": "2.5",
        "displayName": "Gemini 2.5 Pro",
        "description": "Stable release (June 17th, 2025) of Gemini 2.5 Pro",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": _GENERATE_METHODS,
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    },
    {
        "name": "models/gemini-2.5-flash-lite",
        "version": "001",
        "displayName": "Gemini 2.5 Flash-Lite",
        "description": "Stable version of Gemini 2.5 Flash-Lite, released in July of 2025",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": _GENERATE_METHODS,
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    },
    {
        "name": "models/gemini-2.0-flash",
        "version": "2.0",
        "displayName": "Gemini 2.0 Flash",
        "description": "Gemini 2.0 Flash",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": _GENERATE_METHODS,
        "temperature": 1,
        "topP": 0.95,
        "topK": 40,
        "maxTemperature": 2,
    },
    {
        "name": "models/gemini-embedding-001",
        "version": "001",
        "displayName": "Gemini Embedding 001",
        "description": "Obtain a distributed representation of a text.",
        "inputTokenLimit": 2048,
        "outputTokenLimit": 1,
        "supportedGenerationMethods": [
            "embedContent",
            "countTextTokens",
            "countTokens",
            "asyncBatchEmbedContent",
        ],
    },
)

_WORDS = (
    "amber",
    "anchor",
    "aurora",
    "beacon",
    "birch",
    "bright",
    "canyon",
    "cedar",
    "circuit",
    "clear",
    "cobalt",
    "comet",
    "coral",
    "crystal",
    "delta",
    "drift",
    "echo",
    "ember",
    "fable",
    "falcon",
    "fern",
    "field",
    "flint",
    "forest",
    "gentle",
    "glacier",
    "golden",
    "harbor",
    "horizon",
    "island",
    "jade",
    "kindle",
    "lantern",
    "linen",
    "lunar",
    "maple",
    "meadow",
    "mellow",
    "meteor",
    "mist",
    "nimbus",
    "north",
    "ocean",
    "orbit",
    "pebble",
    "prairie",
    "quartz",
    "quiet",
    "raven",
    "ridge",
    "river",
    "saffron",
    "signal",
    "silver",
    "solar",
    "spruce",
    "summit",
    "tidal",
    "timber",
    "valley",
    "velvet",
    "willow",
    "winter",
    "zephyr",
)

_WORDS_PER_CHUNK = 3
_MAX_CANDIDATES = 8
_MAX_BATCH = 100
_MAX_PAGE_SIZE = 1000
_DEFAULT_PAGE_SIZE = 50
_EMBEDDING_DIMENSIONS = 3072
_MEDIA_PART_TOKENS = 258

_JSON_TYPE = "application/json; charset=UTF-8"
_GOOGLE_HEADERS = {
    "vary": "Origin, X-Origin, Referer",
    "x-xss-protection": "0",
    "x-frame-options": "SAMEORIGIN",
    "x-content-type-options": "nosniff",
}
_LIST_MODELS_HINT = (
    "Call ListModels to see the list of available models and their supported methods."
)

#: ``fail_with``: a status for every model call, or a per-request choice (``None``: answer).
FailWith = int | Callable[[Request], int | Response | None] | None


_Handler = Callable[[Request, str, str, str], Awaitable[Response]]


class _GoogleError(Exception):
    """An error answer in Google's envelope, raised inside handlers."""

    def __init__(
        self, code: int, message: str, *, details: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)


def _bad_request(message: str, field: str | None = None) -> _GoogleError:
    violation = {"field": field, "description": message} if field else {"description": message}
    detail = {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}
    return _GoogleError(400, message, details=[detail])


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What the stand-in received: for tests that check what an upstream is sent."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), if any."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


class StreamGate:
    """Test hook: hold every stream before chunk ``after`` until :meth:`release`.

    It also records how each stream ended (``"completed"`` or ``"cancelled"``). Thread-safe:
    the stand-in may run in a server thread's event loop while a test in another thread or
    loop calls :meth:`release` and waits with :meth:`wait_held` / :meth:`wait_ended`.
    """

    def __init__(self, *, after: int = 1) -> None:
        if after < 1:
            raise ValueError("after must be at least 1")
        self.after = after
        self._lock = threading.Lock()
        self._released = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._held = threading.Event()
        self._ended = threading.Event()
        self._outcomes: list[str] = []

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    @property
    def outcomes(self) -> list[str]:
        """How the streams ended so far, in order."""
        with self._lock:
            return list(self._outcomes)

    def release(self) -> None:
        """Let every held stream (and every later one) continue."""
        with self._lock:
            self._released = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is already closed
                continue

    async def hold(self) -> None:
        """Wait here until released (called by the stand-in's stream)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if self._released:
                return
            self._waiters.append((loop, event))
        self._held.set()
        await event.wait()

    def record(self, outcome: str) -> None:
        """Note how a stream ended."""
        with self._lock:
            self._outcomes.append(outcome)
        self._ended.set()

    def wait_held(self, timeout: float) -> bool:
        """Block until a stream is held (``False`` on timeout)."""
        return self._held.wait(timeout)

    def wait_ended(self, timeout: float) -> bool:
        """Block until a stream has ended (``False`` on timeout)."""
        return self._ended.wait(timeout)

    async def held(self, within: float) -> bool:
        """Await until a stream is held, at most ``within`` seconds, without blocking."""
        return await _poll(self._held, within)

    async def ended(self, within: float) -> bool:
        """Await until a stream has ended, at most ``within`` seconds, without blocking."""
        return await _poll(self._ended, within)


async def _poll(event: threading.Event, within: float) -> bool:
    deadline = time.monotonic() + within
    while not event.is_set():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# -- request field access -------------------------------------------------------------------


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def _field(obj: Mapping[str, Any], camel: str) -> Any:
    """``obj[camel]``, or its snake_case spelling (proto3 JSON accepts both)."""
    if camel in obj:
        return obj[camel]
    return obj.get(_snake(camel))


def _as_int(value: Any, path: str) -> int:
    """A proto int32 from JSON: integers, integral floats and numeric strings."""
    if isinstance(value, bool):
        raise _bad_request(f"Invalid value at '{path}' (TYPE_INT32), {json.dumps(value)}", path)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _bad_request(f"Invalid value at '{path}' (TYPE_INT32), {json.dumps(value)}", path)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad_request(
            f'Invalid JSON payload received. Unknown name "{path}": Proto field is not a message.',
            path,
        )
    return value


def _contents(value: Any, path: str) -> list[Mapping[str, Any]]:
    """A ``contents`` list (a single Content object is accepted too)."""
    if value is None:
        return []
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
        raise _bad_request(
            f'Invalid JSON payload received. Unknown name "{path}": Proto field is not '
            "repeating, cannot start list.",
            path,
        )
    return items


def _parts(content: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    parts = content.get("parts")
    if isinstance(parts, Mapping):
        return [parts]
    if isinstance(parts, list):
        return [part for part in parts if isinstance(part, Mapping)]
    return []


def estimate_tokens(text: str) -> int:
    """The stand-in's token estimate for ``text``: ``ceil(len(text) / 4)``."""
    return math.ceil(len(text) / 4)


def _part_tokens(part: Mapping[str, Any]) -> int:
    text = part.get("text")
    if isinstance(text, str):
        return estimate_tokens(text)
    if any(_field(part, name) is not None for name in ("inlineData", "fileData")):
        return _MEDIA_PART_TOKENS
    return estimate_tokens(json.dumps(part, sort_keys=True))


@dataclass(frozen=True, slots=True)
class _Prompt:
    """What the reply and the counts are derived from."""

    text: str
    tokens: int


def _prompt(request_body: Mapping[str, Any], prefix: str) -> _Prompt:
    """Validate and measure a ``GenerateContentRequest`` (``prefix`` names it in errors)."""
    contents = _contents(_field(request_body, "contents"), "contents")
    if not contents:
        raise _GoogleError(400, f"* {prefix}.contents: contents is not specified\n")
    texts: list[str] = []
    tokens = 0
    system = _field(request_body, "systemInstruction")
    pieces = [*_contents(system, "system_instruction"), *contents]
    for index, content in enumerate(contents):
        if not _parts(content):
            raise _GoogleError(
                400, f"* {prefix}.contents[{index}].parts: contents.parts must not be empty.\n"
            )
    for content in pieces:
        for part in _parts(content):
            tokens += _part_tokens(part)
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
    tools = _field(request_body, "tools")
    if tools:
        tokens += estimate_tokens(json.dumps(tools, sort_keys=True))
    return _Prompt(text="\n".join(texts), tokens=tokens)


# -- deterministic output -------------------------------------------------------------------


def _digest_stream(seed: bytes, count: int) -> bytes:
    """``count`` pseudo-random bytes derived from ``seed`` (SHA-256 in counter mode)."""
    out = bytearray()
    block = 0
    while len(out) < count:
        out += hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        block += 1
    return bytes(out[:count])


def _seed(*values: str) -> bytes:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).digest()


def _reply_words(seed: bytes, candidate: int, max_tokens: int | None) -> tuple[list[str], bool]:
    """The words of one candidate's reply and whether ``max_tokens`` cut it short."""
    stream = _digest_stream(seed + candidate.to_bytes(2, "big"), 64)
    count = 12 + stream[0] % 13
    words = [_WORDS[byte % len(_WORDS)] for byte in stream[1 : 1 + count]]
    words[0] = words[0].capitalize()
    words[-1] += "."
    if max_tokens is None:
        return words, False
    kept = 0
    while kept < len(words) and estimate_tokens(" ".join(words[: kept + 1])) <= max_tokens:
        kept += 1
    return words[:kept], kept < len(words)


def _response_id(seed: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(b"id" + seed).digest()[:16]).decode()[:22]


def _embedding(seed: bytes, dimensions: int) -> list[float]:
    raw = _digest_stream(seed, 4 * dimensions)
    values = [(n / 2**31) - 1.0 for n in struct.unpack(f">{dimensions}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


# -- wire format ----------------------------------------------------------------------------


def _json_bytes(payload: Any) -> bytes:
    """Google's pretty-printed JSON (2-space indent)."""
    return json.dumps(payload, indent=2, ensure_ascii=False).encode()


def _sse_event(payload: Any) -> bytes:
    """One Gemini SSE event: ``data: <json>`` with Google's separators, then CRLF CRLF."""
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ": "), ensure_ascii=False).encode()
        + (b"\r\n\r\n")
    )


def _json_response(payload: Any) -> Response:
    headers = {"content-type": _JSON_TYPE, **_GOOGLE_HEADERS}
    return Response(_json_bytes(payload), status_code=200, headers=headers)


def _error_response(error: _GoogleError) -> Response:
    body = error_body(error.code, error.message, details=error.details)
    headers = {"content-type": _JSON_TYPE, **_GOOGLE_HEADERS}
    return Response(body, status_code=error.code, headers=headers)


def _canned_error(code: int, model: str | None) -> _GoogleError:
    """Google's own answer for an injected failure status."""
    if code == 429:
        return _GoogleError(
            429,
            "You exceeded your current quota, please check your plan and billing details. For "
            "more information on this error, head to: "
            "https://ai.google.dev/gemini-api/docs/rate-limits.",
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": model or "unknown"},
                            "quotaValue": "10",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "27s"},
            ],
        )
    messages = {
        400: "Request contains an invalid argument.",
        403: "Method doesn't allow unregistered callers (callers without established "
        "identity). Please use API Key or other form of API consumer identity to call this API.",
        404: "Requested entity was not found.",
        500: "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
        503: "The model is overloaded. Please try again later.",
        504: "Deadline expired before operation could complete.",
    }
    return _GoogleError(code, messages.get(code, f"{reason_phrase(code)}."))


def _not_found(model: str, version: str, method: str) -> _GoogleError:
    return _GoogleError(
        404,
        f"models/{model} is not found for API version {version}, or is not supported for "
        f"{method}. {_LIST_MODELS_HINT}",
    )


def _invalid_json(raw: bytes, exc: ValueError) -> _GoogleError:
    """Google's message for a body that is not JSON: the offending line and a caret."""
    text = raw.decode("utf-8", errors="replace")
    position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
    line_start = text.rfind("\n", 0, position) + 1
    line_end = text.find("\n", position)
    line = text[line_start : line_end if line_end >= 0 else len(text)]
    column = position - line_start
    start = max(0, column - 30)
    snippet = line[start : start + 60]
    message = (
        f"Invalid JSON payload received. Unexpected token.\n{snippet}\n{' ' * (column - start)}^"
    )
    return _bad_request(message)


# -- the app --------------------------------------------------------------------------------


class _Standin:
    """Configuration plus the handlers; no per-request state lives here."""

    def __init__(
        self,
        *,
        models: Sequence[Mapping[str, Any]],
        chunk_delay: float,
        latency: float,
        gate: StreamGate | None,
        api_keys: Sequence[str] | None,
        received: list[ReceivedRequest] | None,
    ) -> None:
        self.models = [dict(model) for model in models]
        self.by_id = {str(model["name"]).removeprefix("models/"): model for model in self.models}
        self.chunk_delay = chunk_delay
        self.latency = latency
        self.gate = gate
        self.api_keys = frozenset(api_keys) if api_keys is not None else None
        self.received = received
        self.methods: dict[str, _Handler] = {
            "generateContent": self.generate,
            "streamGenerateContent": self.stream,
            "countTokens": self.count_tokens,
            "embedContent": self.embed,
            "batchEmbedContents": self.batch_embed,
        }

    # ---- shared checks

    async def preflight(self, request: Request, model: str | None) -> Response | None:
        """Record, check the key, inject failures, add latency; a Response short-cuts."""
        version = request.path_params["version"]
        if version not in API_VERSIONS:
            raise _GoogleError(404, "Method not found.")
        body = await request.body()
        if self.received is not None:
            self.received.append(
                ReceivedRequest(
                    method=request.method,
                    path=request.url.path,
                    query=tuple(request.query_params.multi_items()),
                    headers=tuple((k.lower(), v) for k, v in request.headers.items()),
                    body=body,
                )
            )
        self.check_key(request)
        fail_with: FailWith = request.app.state.fail_with
        choice = fail_with(request) if callable(fail_with) else fail_with
        if isinstance(choice, Response):
            return choice
        if choice is not None:
            raise _canned_error(choice, model)
        if self.latency > 0:
            await anyio.sleep(self.latency)
        return None

    def check_key(self, request: Request) -> None:
        if self.api_keys is None:
            return
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            raise _canned_error(403, None)
        if key not in self.api_keys:
            message = "API key not valid. Please pass a valid API key."
            raise _GoogleError(
                400,
                message,
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                        "locale": "en-US",
                        "message": message,
                    },
                ],
            )

    def model_for(self, model: str, version: str, method: str, needs: str) -> Mapping[str, Any]:
        found = self.by_id.get(model)
        if found is None or needs not in found.get("supportedGenerationMethods", ()):
            raise _not_found(model, version, method)
        return found

    @staticmethod
    async def json_body(request: Request) -> Mapping[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _invalid_json(raw, exc) from None
        except RecursionError:
            raise _bad_request("Invalid JSON payload received. Too deeply nested.") from None
        if not isinstance(data, Mapping):
            raise _bad_request("Invalid JSON payload received. Root element must be a message.")
        try:  # what the answers are made from must be text: no lone surrogate ("\ud800")
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _bad_request("Invalid JSON payload received. Invalid \\uXXXX escape.") from None
        except RecursionError:
            raise _bad_request("Invalid JSON payload received. Too deeply nested.") from None
        return data

    # ---- endpoints

    async def list_models(self, request: Request) -> Response:
        try:
            injected = await self.preflight(request, None)
            if injected is not None:
                return injected
            page_size = _DEFAULT_PAGE_SIZE
            if "pageSize" in request.query_params:
                page_size = _as_int(_query_number(request.query_params["pageSize"]), "page_size")
            if page_size <= 0:
                page_size = _DEFAULT_PAGE_SIZE
            page_size = min(page_size, _MAX_PAGE_SIZE)
            offset = _page_offset(request.query_params.get("pageToken"), len(self.models))
        except _GoogleError as error:
            return _error_response(error)
        page: dict[str, Any] = {"models": self.models[offset : offset + page_size]}
        if offset + page_size < len(self.models):
            page["nextPageToken"] = _page_token(offset + page_size)
        return _json_response(page)

    async def model_resource(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        version: str = request.path_params["version"]
        model, _, method = name.partition(":")
        try:
            injected = await self.preflight(request, model)
            if injected is not None:
                return injected
            if request.method == "GET":
                if method:
                    raise _GoogleError(404, "Method not found.")
                found = self.by_id.get(model)
                if found is None:
                    raise _not_found(model, version, "GetModel")
                return _json_response(found)
            handler = self.methods.get(method)
            if handler is None:
                raise _GoogleError(404, "Method not found.")
            return await handler(request, model, version, method)
        except _GoogleError as error:
            return _error_response(error)

    async def generate(self, request: Request, model: str, version: str, method: str) -> Response:
        self.model_for(model, version, method, "generateContent")
        body = await self.json_body(request)
        plan = _plan(body, model, "GenerateContentRequest")
        return _json_response(plan.response())

    async def stream(self, request: Request, model: str, version: str, method: str) -> Response:
        self.model_for(model, version, method, "generateContent")
        body = await self.json_body(request)
        plan = _plan(body, model, "GenerateContentRequest")
        chunks = plan.chunks()
        if request.query_params.get("alt") == "sse":
            frames = [_sse_event(chunk) for chunk in chunks]
            headers = {"content-type": "text/event-stream", "content-disposition": "attachment"}
        else:
            frames = _json_array_pieces(chunks)
            headers = {"content-type": _JSON_TYPE}
        return StreamingResponse(self._paced(frames), headers={**headers, **_GOOGLE_HEADERS})

    async def _paced(self, frames: Sequence[bytes]) -> AsyncIterator[bytes]:
        completed = False
        try:
            for index, frame in enumerate(frames):
                if index > 0:
                    if self.gate is not None and index == self.gate.after:
                        await self.gate.hold()
                    if self.chunk_delay > 0:
                        await anyio.sleep(self.chunk_delay)
                yield frame
            completed = True
        finally:
            if self.gate is not None:
                self.gate.record("completed" if completed else "cancelled")

    async def count_tokens(
        self, request: Request, model: str, version: str, method: str
    ) -> Response:
        self.model_for(model, version, method, "countTokens")
        body = await self.json_body(request)
        wrapped = _field(body, "generateContentRequest")
        if _field(body, "contents") is None and wrapped is not None:
            prompt = _prompt(
                _mapping(wrapped, "generate_content_request"),
                "CountTokensRequest.generate_content_request",
            )
        else:
            prompt = _prompt(body, "CountTokensRequest")
        return _json_response(
            {
                "totalTokens": prompt.tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt.tokens}],
            }
        )

    async def embed(self, request: Request, model: str, version: str, method: str) -> Response:
        self.model_for(model, version, method, "embedContent")
        body = await self.json_body(request)
        return _json_response({"embedding": _embed_one(body, model, "EmbedContentRequest")})

    async def batch_embed(
        self, request: Request, model: str, version: str, method: str
    ) -> Response:
        self.model_for(model, version, method, "embedContent")
        body = await self.json_body(request)
        requests = _field(body, "requests")
        if not requests:
            raise _GoogleError(
                400, "* BatchEmbedContentsRequest.requests: requests is not specified\n"
            )
        if not isinstance(requests, list) or not all(isinstance(r, Mapping) for r in requests):
            raise _bad_request(
                'Invalid JSON payload received. Unknown name "requests": Proto field is not '
                "repeating, cannot start list.",
                "requests",
            )
        if len(requests) > _MAX_BATCH:
            raise _GoogleError(
                400,
                f"* BatchEmbedContentsRequest.requests: at most {_MAX_BATCH} requests can "
                "be in one batch\n",
            )
        embeddings = [
            _embed_one(item, model, f"BatchEmbedContentsRequest.requests[{index}]")
            for index, item in enumerate(requests)
        ]
        return _json_response({"embeddings": embeddings})


def _query_number(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"models-offset:{offset}".encode()).decode().rstrip("=")


def _page_offset(token: str | None, total: int) -> int:
    if not token:
        return 0
    try:
        decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, _, number = decoded.partition(":")
        offset = int(number)
    except ValueError:
        raise _bad_request("Invalid page token.", "page_token") from None
    if prefix != "models-offset" or not 0 <= offset <= total:
        raise _bad_request("Invalid page token.", "page_token")
    return offset


def _embed_one(body: Mapping[str, Any], model: str, prefix: str) -> dict[str, Any]:
    content = _field(body, "content")
    if content is None:
        raise _GoogleError(400, f"* {prefix}.content: content is not specified\n")
    parts = _parts(_mapping(content, "content"))
    text = "\n".join(str(p["text"]) for p in parts if isinstance(p.get("text"), str))
    dimensions = _EMBEDDING_DIMENSIONS
    requested = _field(body, "outputDimensionality")
    if requested is not None:
        dimensions = _as_int(requested, "output_dimensionality")
        if not 1 <= dimensions <= _EMBEDDING_DIMENSIONS:
            raise _bad_request(
                f"* {prefix}.output_dimensionality: must be between 1 and "
                f"{_EMBEDDING_DIMENSIONS}\n",
                "output_dimensionality",
            )
    task_type = str(_field(body, "taskType") or "")
    return {"values": _embedding(_seed("embed", model, task_type, text), dimensions)}


@dataclass(frozen=True, slots=True)
class _Plan:
    """One generate answer, planned word by word so JSON and stream agree."""

    model: str
    prompt_tokens: int
    replies: tuple[tuple[tuple[str, ...], str], ...]  # (words, finishReason) per candidate
    response_id: str

    def _usage(self, texts: Sequence[str]) -> dict[str, Any]:
        candidates = sum(estimate_tokens(text) for text in texts)
        return {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": candidates,
            "totalTokenCount": self.prompt_tokens + candidates,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt_tokens}],
        }

    def _envelope(self, candidates: list[dict[str, Any]], texts: Sequence[str]) -> dict[str, Any]:
        return {
            "candidates": candidates,
            "usageMetadata": self._usage(texts),
            "modelVersion": self.model,
            "responseId": self.response_id,
        }

    def response(self) -> dict[str, Any]:
        """The whole ``GenerateContentResponse``."""
        texts = [" ".join(words) for words, _ in self.replies]
        candidates = [
            {"content": _content(text), "finishReason": finish, "index": index}
            for index, (text, (_, finish)) in enumerate(zip(texts, self.replies, strict=True))
        ]
        return self._envelope(candidates, texts)

    def chunks(self) -> list[dict[str, Any]]:
        """The stream: a few words per chunk, cumulative usage, finishReason on the last.

        Every chunk carries every candidate; a stream has at least two chunks (a short reply
        ends with a parts-less chunk holding the finishReason, as the live API does).
        """
        pieces = [
            [
                " ".join(words[i : i + _WORDS_PER_CHUNK])
                for i in range(0, len(words), _WORDS_PER_CHUNK)
            ]
            for words, _ in self.replies
        ]
        count = max(2, *(len(p) for p in pieces))
        so_far = ["" for _ in self.replies]
        chunks = []
        for step in range(count):
            candidates = []
            for index, (own, (_, finish)) in enumerate(zip(pieces, self.replies, strict=True)):
                piece = ""
                if step < len(own):
                    piece = own[step] if step == 0 else " " + own[step]
                    so_far[index] += piece
                candidate: dict[str, Any] = {"content": _content(piece)}
                if step == count - 1:
                    candidate["finishReason"] = finish
                candidate["index"] = index
                candidates.append(candidate)
            chunks.append(self._envelope(candidates, so_far))
        return chunks


def _content(text: str) -> dict[str, Any]:
    if not text:
        return {"role": "model"}
    return {"parts": [{"text": text}], "role": "model"}


def _plan(body: Mapping[str, Any], model: str, prefix: str) -> _Plan:
    prompt = _prompt(body, prefix)
    config = _mapping(_field(body, "generationConfig"), "generation_config")
    max_tokens: int | None = None
    raw_max = _field(config, "maxOutputTokens")
    if raw_max is not None:
        max_tokens = _as_int(raw_max, "generation_config.max_output_tokens")
        if max_tokens <= 0:
            max_tokens = None  # Google treats an unset or zero limit as the model's own
    count = 1
    raw_count = _field(config, "candidateCount")
    if raw_count is not None:
        count = _as_int(raw_count, "generation_config.candidate_count")
        if not 1 <= count <= _MAX_CANDIDATES:
            raise _bad_request(
                f"* GenerateContentRequest.generation_config.candidate_count: must be in the "
                f"range [1, {_MAX_CANDIDATES}]\n",
                "generation_config.candidate_count",
            )
    seed = _seed("generate", model, prompt.text)
    replies = []
    for index in range(count):
        words, truncated = _reply_words(seed, index, max_tokens)
        replies.append((tuple(words), "MAX_TOKENS" if truncated else "STOP"))
    return _Plan(
        model=model,
        prompt_tokens=prompt.tokens,
        replies=tuple(replies),
        response_id=_response_id(seed),
    )


def _json_array_pieces(chunks: Sequence[Any]) -> list[bytes]:
    """The JSON-array stream, one piece per chunk; joined: ``json.dumps(chunks, indent=2)``."""
    pieces = []
    for index, chunk in enumerate(chunks):
        body = "\n".join("  " + line for line in json.dumps(chunk, indent=2).splitlines())
        pieces.append(("[\n" if index == 0 else ",\n") + body)
    pieces[-1] += "\n]"
    return [piece.encode() for piece in pieces]


def create_standin(
    *,
    models: Sequence[Mapping[str, Any]] = DEFAULT_MODELS,
    chunk_delay: float = 0.0,
    latency: float = 0.0,
    gate: StreamGate | None = None,
    fail_with: FailWith = None,
    api_keys: Sequence[str] | None = None,
    received: list[ReceivedRequest] | None = None,
) -> Starlette:
    """Build the offline Gemini stand-in (see the module docstring for behaviour and hooks).

    ``models`` are ``Model`` resources (``name`` is ``models/<id>``); ``api_keys=None``
    accepts any key or none, as a keyless demo upstream should.
    """
    standin = _Standin(
        models=models,
        chunk_delay=chunk_delay,
        latency=latency,
        gate=gate,
        api_keys=api_keys,
        received=received,
    )

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "Method not found." if code in (404, 405) else f"{reason_phrase(code)}."
        return _error_response(_GoogleError(404 if code == 405 else code, message))

    app = Starlette(
        routes=[
            Route("/{version}/models", standin.list_models, methods=["GET"]),
            Route("/{version}/models/{name}", standin.model_resource, methods=["GET", "POST"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.fail_with = fail_with
    app.state.standin_gate = gate
    return app
