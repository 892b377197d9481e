"""Gemini token accounting: reserve an estimate before a call, settle to ``usageMetadata`` after.

:func:`estimate_request_tokens` prices a request body before it is sent;
:class:`UsageObserver` reads the real usage from the answer while the answer streams past
(research/gemini-api.md §1.3-§1.6; research/security.md B21, B23).

The estimate (a reservation, corrected by the real usage afterwards):

* text: ``ceil(len(text) / 4)`` per text part. "A token is about 4 characters" is the rule
  Google documents for Gemini (ai.google.dev/gemini-api/docs/tokens: "100 tokens is about
  60-80 English words"), and it is what the offline stand-in charges
  (``example_app.standin.estimate_tokens``), so estimates against the stand-in are exact.
  It is *not* conservative for CJK text: Google documents only the English figure, and
  Gemini's SentencePiece vocabulary (about 256k pieces) spends roughly one token per one or
  two Chinese/Japanese/Korean characters (third-party measurements; not checked against the
  real tokenizer here), so ``chars / 4`` undercounts such prompts about 2-4x. The settlement
  charges the real usage; only the up-front check is looser for those prompts.
* ``inlineData`` / ``fileData`` parts: 258 tokens each, Google's figure for one image up to
  384 px (and per 768 px tile, per PDF page), also the stand-in's; a floor for video and audio
  (263 and 32 tokens per second), which the settlement corrects.
* other parts (function calls and responses, code) and ``tools``: a quarter of their JSON size.
* output: ``generationConfig.maxOutputTokens`` (else ``default_output_tokens``), capped by
  ``max_output_cap``, times ``candidateCount``. ``maxOutputTokens`` bounds thinking too
  (Gemini 2.5). ``countTokens`` and embeddings have no output. Context from
  ``cachedContent`` is unknown here and only charged at settlement.
* a limiter that settles on ``count="input"`` reserves the prompt alone, one on
  ``count="output"`` the output allowance alone: what it will charge, never a part it never
  charges (which would refuse a request its budget holds).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, Final, Literal

import orjson
from mypy_extensions import mypyc_attr

__all__ = [
    "CHARS_PER_TOKEN",
    "COUNTS",
    "IN_PIECES",
    "MEDIA_PART_TOKENS",
    "AnswerUsage",
    "UsageObserver",
    "body_usage",
    "estimate_request_tokens",
    "usage_split",
    "usage_tokens",
    "whole_answer_usage",
]

logger = logging.getLogger("gemini_scale.ratelimit.usage")

#: Characters per token of the text estimate (Google's documented rule of thumb).
CHARS_PER_TOKEN: Final = 4
#: Tokens charged per ``inlineData`` / ``fileData`` part (Gemini's per-image figure).
MEDIA_PART_TOKENS: Final = 258

Kind = Literal["json", "sse", "json_array", "auto"]
Count = Literal["total", "input", "output"]
#: Every ``Count``, for checking one given at run time.
COUNTS: Final = ("total", "input", "output")

# -- request estimate ---------------------------------------------------------------------

_MAX_ITEMS: Final = 20_000  # contents, parts and JSON values looked at per request
_MAX_DEPTH: Final = 32  # nesting followed inside function calls, responses and tools
_INT32_MAX: Final = 2**31 - 1
_MAX_ESTIMATE: Final = 2**53 - 1  # exact in a Lua number (the Redis scripts)
_HALF_CAP: Final = 2**52  # two counts below it add up to less than the cap
_METHOD_KINDS: Final = {
    "generateContent": "generate",
    "streamGenerateContent": "generate",
    "countTokens": "count",
    "embedContent": "embed",
    "batchEmbedContents": "batch",
}
_SHAPES: Final = (
    ("contents", "contents", "generate"),
    ("generateContentRequest", "generate_content_request", "count"),
    ("requests", "requests", "batch"),
    ("content", "content", "embed"),
)


def _is_map(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def _get(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """``obj[camel]`` or its snake_case spelling (proto3 JSON accepts both)."""
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _positive_int(value: Any) -> int | None:
    """A proto int32 from JSON (ints, floats, numeric strings), or ``None`` if unusable."""
    if isinstance(value, str) and len(value) <= 32:
        try:
            value = float(value)
        except ValueError:
            return None
    number: int
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value):
        number = math.ceil(value)
    else:
        return None
    if number <= 0:
        return None  # Google reads 0 as "unset"
    return min(number, _INT32_MAX)


class _Walk:
    """Prompt measurement with a bound on the items looked at."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = _MAX_ITEMS

    def contents(self, value: Any) -> int:
        """Tokens of a ``contents`` list (or a single ``Content``)."""
        if type(value) is not list and not isinstance(value, list | tuple):
            return self.content(value) if _is_map(value) else 0
        tokens = 0
        for content in islice(value, max(self.left, 0)):
            tokens += self.content(content)
            if self.left <= 0:
                break
        return tokens

    def content(self, content: Any) -> int:
        self.left -= 1
        if not _is_map(content):
            return 0
        parts = content.get("parts")
        if type(parts) is not list and not isinstance(parts, list | tuple):
            return self.part(parts) if _is_map(parts) else 0
        tokens = 0
        for part in islice(parts, max(self.left, 0)):
            if type(part) is dict:  # the common case, inlined: a text part
                text = part.get("text")
                if type(text) is str:
                    self.left -= 1
                    tokens += (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
                    continue
            tokens += self.part(part)
        return tokens

    def part(self, part: Any) -> int:
        self.left -= 1
        if not _is_map(part):
            return 0
        text = part.get("text")
        if isinstance(text, str):
            return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
        if (
            _get(part, "inlineData", "inline_data") is not None
            or _get(part, "fileData", "file_data") is not None
        ):
            return MEDIA_PART_TOKENS
        return self.json_tokens(part)

    def json_tokens(self, value: Any) -> int:
        """About a quarter of ``json.dumps(value)``'s length, walked iteratively and bounded."""
        chars = 0
        self.left -= 1
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, str):
                chars += len(item) + 2
            elif item is None or isinstance(item, bool):
                chars += 5
            elif isinstance(item, int):
                chars += item.bit_length() * 3 // 10 + 2
            elif isinstance(item, float):
                chars += len(repr(item))
            elif depth >= _MAX_DEPTH or self.left <= 0:
                chars += 2
            elif _is_map(item):
                chars += 2
                for key, sub in islice(item.items(), self.left):
                    self.left -= 1
                    chars += (len(key) if isinstance(key, str) else 8) + 6  # "key": , separators
                    stack.append((sub, depth + 1))
            elif isinstance(item, list | tuple):
                chars += 2
                for sub in islice(item, self.left):
                    self.left -= 1
                    chars += 2
                    stack.append((sub, depth + 1))
        return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN

    def prompt(self, request: Mapping[str, Any]) -> int:
        """A ``GenerateContentRequest``'s input: contents, system instruction and tools."""
        tokens = self.contents(_get(request, "contents", "contents"))
        system = _get(request, "systemInstruction", "system_instruction")
        if system is not None:
            tokens += self.contents(system)
        tools = request.get("tools")
        if tools:
            tokens += self.json_tokens(tools)
        return tokens

    def embed(self, request: Any) -> int:
        """An ``EmbedContentRequest``'s input: its content and title."""
        self.left -= 1
        if not _is_map(request):
            return 0
        tokens = self.contents(request.get("content"))
        title = request.get("title")
        if isinstance(title, str):
            tokens += (len(title) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
        return tokens


def _request_kind(method: str | None, body: Mapping[str, Any]) -> str:
    kind = _METHOD_KINDS.get(method.rpartition(":")[2]) if method else None
    if kind is None:
        # The body's shape: generate (or countTokens with contents), the countTokens
        # wrapper, a batch of embeddings, one embedding.
        kind = next(
            (kind for camel, snake, kind in _SHAPES if _get(body, camel, snake) is not None),
            "generate",
        )
    return kind


def _output_allowance(body: Mapping[str, Any], default: int, cap: int | None) -> int:
    per_candidate: int | None = None
    candidates = 1
    config = _get(body, "generationConfig", "generation_config")
    if _is_map(config):
        per_candidate = _positive_int(_get(config, "maxOutputTokens", "max_output_tokens"))
        candidates = _positive_int(_get(config, "candidateCount", "candidate_count")) or 1
    if per_candidate is None:
        per_candidate = default
    if cap is not None:
        per_candidate = min(per_candidate, cap)
    return max(per_candidate, 0) * candidates


def _estimate(
    body: Any,
    default_output_tokens: int,
    max_output_cap: int | None,
    method: str | None,
    count: Count,
) -> int:
    if not _is_map(body):
        body = {}
    walk = _Walk()
    kind = _request_kind(method, body)
    if kind != "generate":  # countTokens and embeddings have no output
        return 0 if count == "output" else _unanswered_prompt(walk, kind, body)
    cap = None if max_output_cap is None else int(max_output_cap)
    prompt = 0 if count == "output" else walk.prompt(body)
    output = 0 if count == "input" else _output_allowance(body, int(default_output_tokens), cap)
    return prompt + output


def _unanswered_prompt(walk: _Walk, kind: str, body: Mapping[str, Any]) -> int:
    """The prompt of a request without output: an embedding, a batch, a ``countTokens``."""
    if kind == "embed":
        return walk.embed(body)
    if kind == "batch":
        requests = body.get("requests")
        if not isinstance(requests, list | tuple):
            return 0
        tokens = 0
        for request in islice(requests, _MAX_ITEMS):
            tokens += walk.embed(request)
            if walk.left <= 0:
                break
        return tokens
    wrapped = _get(body, "generateContentRequest", "generate_content_request")
    if body.get("contents") is None and _is_map(wrapped):
        return walk.prompt(wrapped)
    return walk.prompt(body)


def _plain_generate(
    body: Any,
    default_output_tokens: int,
    max_output_cap: int | None,
    method: str | None,
    count: Count,
) -> int | None:
    """The usual request priced without the walker (what :func:`_estimate` gives for it):
    a ``generateContent`` body of text parts, with no system instruction or tools, and
    output limits that are positive integers if given. ``None`` for anything else."""
    if type(body) is not dict or _METHOD_KINDS.get(method or "") != "generate":
        return None
    contents = body.get("contents")
    if (
        type(contents) is not list
        or body.get("systemInstruction") is not None
        or body.get("system_instruction") is not None
        or body.get("tools")
    ):
        return None
    tokens = 0
    items = len(contents)
    for content in contents:
        parts = content.get("parts") if type(content) is dict else None
        if type(parts) is not list:
            return None
        items += len(parts)
        for part in parts:
            text = part.get("text") if type(part) is dict else None
            if type(text) is not str:
                return None
            tokens += (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    output = 0 if count == "input" else _plain_output(body, int(default_output_tokens),
                                                      max_output_cap)
    if output is None or items > _MAX_ITEMS:  # (past the bound, the walker's applies)
        return None
    return output if count == "output" else tokens + output


def _plain_output(body: dict[str, Any], default: int, cap: int | None) -> int | None:
    """:func:`_output_allowance` when the limits given are positive integers, else ``None``."""
    per_candidate, candidates = default, 1
    config = body.get("generationConfig")  # _get, inlined here and below
    if config is None:
        config = body.get("generation_config")
    if config is not None:
        if type(config) is not dict:
            return None
        given = config.get("maxOutputTokens")
        if given is None:
            given = config.get("max_output_tokens")
        count = config.get("candidateCount")
        if count is None:
            count = config.get("candidate_count")
        if (given is not None and (type(given) is not int or given <= 0)) or (
            count is not None and (type(count) is not int or count <= 0)
        ):
            return None
        if given is not None:
            per_candidate = min(given, _INT32_MAX)
        if count is not None:
            candidates = min(count, _INT32_MAX)
    if cap is not None:
        per_candidate = min(per_candidate, int(cap))
    return max(per_candidate, 0) * candidates


def estimate_request_tokens(
    body: Mapping[str, Any] | None,
    *,
    default_output_tokens: int = 1024,
    max_output_cap: int | None = None,
    method: str | None = None,
    count: Count = "total",
) -> int:
    """Tokens to reserve for a Gemini request body (see the module docstring for the rule).

    ``method`` (``generateContent``, ``streamGenerateContent``, ``countTokens``,
    ``embedContent``, ``batchEmbedContents``; a ``models/x:method`` tail is fine) says which
    request this is; without it the shape decides, and a plain ``{"contents": ...}``
    ``countTokens`` body then looks like a generate request and gets an output allowance.
    ``max_output_cap`` clamps the per-candidate output allowance (e.g. the model's
    ``outputTokenLimit``). ``count`` prices what the settlement will charge
    (:func:`usage_tokens`): ``"total"`` the prompt and the output allowance, ``"input"``
    the prompt alone, ``"output"`` the output allowance alone. Never raises; the answer is
    an int in ``[1, 2**53 - 1]``. At most 20,000 contents, parts and JSON values are
    looked at (nesting deeper than 32 is not followed), so a hostile body costs at most
    about 10 ms and is underestimated, never fatal; a typical request costs 3-15 µs.
    """
    try:
        tokens = _plain_generate(body, default_output_tokens, max_output_cap, method, count)
        if tokens is None:
            tokens = _estimate(body, default_output_tokens, max_output_cap, method, count)
    except Exception:  # a hostile Mapping; JSON-derived bodies never get here
        logger.debug("token estimate failed; using the output allowance", exc_info=True)
        tokens = default_output_tokens if isinstance(default_output_tokens, int) else 1
    return min(max(tokens, 1), _MAX_ESTIMATE)


# -- usage from responses -----------------------------------------------------------------


#: Bound once (compiled, reading a module's attribute per call is a cost of its own).
_orjson: Final = orjson.loads
_OrjsonError: Final = orjson.JSONDecodeError


def _orjson_loads(raw: bytes | bytearray) -> Any:
    """:func:`json.loads` of an answer, through orjson unless it refuses (``NaN``, lone
    surrogates, deep nesting). Unlike :func:`gemini_scale.fastjson.loads`, integers past 64
    bits may come back as floats: every count read here is clamped to ``2**53 - 1`` either
    way, so the result is the same and the digit scan is saved on every answer."""
    try:
        return _orjson(raw)
    except _OrjsonError:
        return json.loads(raw)


#: What reads an answer's JSON: a module global looked up on each call, so that a test can
#: count the parses (a call to a function by its name is bound when compiled). The usage
#: tail of a whole answer tries orjson directly first (:func:`_usage_tail`).
_loads: Callable[[bytes | bytearray], Any] = _orjson_loads


_USAGE_FIELDS: Final = (
    ("promptTokenCount", "prompt_token_count"),
    ("toolUsePromptTokenCount", "tool_use_prompt_token_count"),
    ("candidatesTokenCount", "candidates_token_count"),
    ("thoughtsTokenCount", "thoughts_token_count"),
    ("totalTokenCount", "total_token_count"),
)


def _usage_count(usage: Mapping[str, Any], camel: str, snake: str) -> int | None:
    value = _get(usage, camel, snake)
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value):
        value = math.ceil(value)
    if isinstance(value, int):
        return min(max(value, 0), _MAX_ESTIMATE)
    return None


def usage_tokens(usage: Mapping[str, Any], count: Count = "total") -> int | None:
    """The tokens a ``usageMetadata`` object reports, or ``None`` if it reports no count.

    ``"total"``: ``totalTokenCount`` (else prompt + tool-use prompt + candidates + thoughts);
    ``"input"``: ``promptTokenCount`` + ``toolUsePromptTokenCount`` (both billed as input;
    cached tokens are already inside the prompt count); ``"output"``:
    ``candidatesTokenCount`` + ``thoughtsTokenCount``. A missing count is 0 when the object
    has any other count (a blocked prompt reports no candidates).
    """
    if count == "total":  # the common case: Gemini reports the total as an integer
        total = usage.get("totalTokenCount")
        if type(total) is int:
            return min(max(total, 0), _MAX_ESTIMATE)
    prompt, tool_use, candidates, thoughts, total = (
        _usage_count(usage, camel, snake) for camel, snake in _USAGE_FIELDS
    )
    if all(value is None for value in (prompt, tool_use, candidates, thoughts, total)):
        return None
    if count == "input":
        tokens = (prompt or 0) + (tool_use or 0)
    elif count == "output":
        tokens = (candidates or 0) + (thoughts or 0)
    elif total is not None:
        return total
    else:
        tokens = (prompt or 0) + (tool_use or 0) + (candidates or 0) + (thoughts or 0)
    return min(tokens, _MAX_ESTIMATE)  # a sum of capped counts is capped too


def usage_split(usage: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(input, output)``: :func:`usage_tokens` for both counts at once."""
    prompt, candidates = usage.get("promptTokenCount"), usage.get("candidatesTokenCount")
    tool_use, thoughts = usage.get("toolUsePromptTokenCount", 0), usage.get("thoughtsTokenCount", 0)
    if (  # the common case: Gemini's camelCase integers, none negative, no sum past the cap
        type(prompt) is int and type(candidates) is int
        and type(tool_use) is int and type(thoughts) is int
        and 0 <= (prompt | candidates | tool_use | thoughts) < _HALF_CAP
        and "tool_use_prompt_token_count" not in usage and "thoughts_token_count" not in usage
    ):
        return prompt + tool_use, candidates + thoughts
    return usage_tokens(usage, "input"), usage_tokens(usage, "output")


def body_usage(body: bytes, content_type: str | None = None) -> Mapping[str, Any] | None:
    """The ``usageMetadata`` of a whole answer body, as :class:`UsageObserver` reads it
    (``usage``), without building an observer for the usual JSON answer."""
    answer = AnswerUsage()
    headers = (
        () if content_type is None
        else ((b"content-type", content_type.encode("latin-1", "replace")),)
    )
    answer.start(200, headers)
    answer.feed(body, False)
    return answer.usage


class AnswerUsage:
    """The usage an answer reports, read from its ASGI messages as they pass.

    The usual answer, one JSON body in one message, is parsed at once; anything else (a
    stream, a body in pieces) goes through a :class:`UsageObserver`, built only then.
    ``tokens`` and ``usage`` are as :class:`UsageObserver` gives them, so far.
    """

    __slots__ = ("_headers", "_observer", "count", "status", "tokens", "usage")

    def __init__(self, count: Count = "total") -> None:
        if count not in COUNTS:
            raise ValueError(f"unknown count {count!r}")
        self.count: Count = count
        self.status: int | None = None
        self.tokens: int | None = None
        self.usage: Mapping[str, Any] | None = None
        # Pairs as ASGI sends them: tuples, or 2-item lists (which ASGI allows too).
        self._headers: Iterable[Sequence[bytes]] = ()
        self._observer: UsageObserver | None = None

    def start(self, status: int, headers: Iterable[Sequence[bytes]]) -> None:
        """Note the ``http.response.start``. Its ``Content-Type`` is read from ``headers``
        later, only if the body needs it: pass headers nobody changes afterwards (ASGI
        layers replace a start message's header list; none edits it in place)."""
        self.status = status
        self._headers = headers

    def feed(self, body: bytes | bytearray | memoryview, more: bool) -> None:
        """Look at one ``http.response.body`` message's body (never raises)."""
        observer = self._observer
        if observer is None:
            if not more:
                usage = whole_answer_usage(body)
                if usage is not IN_PIECES:
                    if type(usage) is dict:
                        total = usage.get("totalTokenCount")
                        tokens = (  # usage_tokens, its usual case inlined
                            min(max(total, 0), _MAX_ESTIMATE)
                            if type(total) is int and self.count == "total"
                            else usage_tokens(usage, self.count)
                        )
                        if tokens is not None:
                            self.usage, self.tokens = usage, tokens
                    return
                if not body:
                    return  # an empty answer
            observer = self._observer = UsageObserver(count=self.count)
            content_type = next(
                (bytes(v).decode("latin-1") for k, v in self._headers
                 if k.lower() == b"content-type"),
                None,
            )
            observer.start(self.status or 200, content_type)
        if more:
            observer.feed(body)
        else:
            observer.feed_last(body)
        self.usage, self.tokens = observer.usage, observer.tokens


#: What :func:`whole_answer_usage` returns for a body it cannot read at once.
IN_PIECES: Final[Any] = object()


def whole_answer_usage(body: bytes | bytearray | memoryview) -> Any:
    """The ``usageMetadata`` value of an answer that came in one message (``None``: it has
    none), or :data:`IN_PIECES` when it must go through a :class:`UsageObserver` (not a
    JSON object, too big or too deep). What :class:`AnswerUsage` does with such a body,
    without the object, for a reader that needs the usage and not its token count."""
    if type(body) is bytes and body[:1] == b"{":
        if len(body) <= _PARSE_WHOLE:  # the usual answer: _whole_json's small case, inlined
            # Its usage alone when that can be read (the candidates are most of the parse).
            usage = _usage_tail(body, len(body))
            if usage is not None:
                return usage
            try:
                value = _orjson(body)
            except _OrjsonError:
                pass  # what only json.loads reads, or not JSON: _whole_json decides
            else:
                if type(value) is not dict:
                    return IN_PIECES
                return _usage_member(value)
        read = _whole_json(body, _DEFAULT_BUFFER)
        if read is not None:
            return read[0]
    return IN_PIECES


def _usage_member(value: dict[str, Any]) -> Any:
    """An answer object's ``usageMetadata`` (or, without that member, ``usage_metadata``),
    ``None`` without either."""
    usage = value.get("usageMetadata", _ABSENT)
    return usage if usage is not _ABSENT else value.get("usage_metadata")


_ABSENT: Final[Any] = object()


_USAGE_MEMBER: Final = b'"usageMetadata"'
_DEFAULT_BUFFER: Final = 1 << 20
#: Bodies up to this size are parsed whole (orjson's fixed cost is most of the time).
_PARSE_WHOLE: Final = 2048


def _whole_json(body: bytes, max_buffer: int) -> tuple[Any, bool] | None:
    """``(usageMetadata, error seen)`` of a whole JSON object body, or ``None`` when it must
    be read incrementally (too big, too deep, or not JSON).

    A small body is parsed whole. In a bigger one, Gemini writes ``usageMetadata`` after
    the candidates, so only the tail from there is parsed (:func:`_usage_tail`), however
    long the answer. A body that names an ``"error"`` anywhere is parsed whole.
    """
    size = len(body)
    if size > _PARSE_WHOLE or size > max_buffer:  # else parsing it all costs less
        if body.find(b'"error"') < 0:
            usage = _usage_tail(body, max_buffer)
            if usage is not None:
                return usage, False
        if size > min(max_buffer, _COPY_LIMIT):
            return None
    try:
        value = _loads(body)
    except (ValueError, RecursionError):
        return None
    if type(value) is not dict:
        return None
    return _usage_member(value), value.get("error") is not None


def _usage_tail(body: bytes, max_buffer: int) -> Any:
    """The value of a JSON object body's own ``usageMetadata`` member, read from the body's
    last ``"usageMetadata"`` on: ``{`` plus the text from there to the end is valid JSON
    exactly when that text closes one object, that is, when the member is the document's
    own and not one nested in the candidates (a function call's arguments, say) or in a
    string (a quote after an odd run of backslashes is inside one). ``None`` when that
    cannot be told this way (no such member, a null one, or more than ``max_buffer``
    bytes from it to the end): the caller parses the body whole."""
    at = body.rfind(_USAGE_MEMBER)
    if at <= 0 or len(body) - at >= max_buffer:
        return None
    before = at - 1
    while before >= 0 and body[before] == _BACKSLASH:
        before -= 1
    if (at - 1 - before) % 2:
        return None  # an escaped quote: this "usageMetadata" is text in a string
    text = b"{" + body[at:]
    try:
        # orjson directly (what _loads calls first): compiled, a call through the module
        # global costs a tenth of this parse; what orjson refuses goes to _loads.
        tail = _orjson(text)
    except _OrjsonError:
        try:
            tail = _loads(text)
        except (ValueError, RecursionError):
            return None
    return tail["usageMetadata"] if type(tail) is dict else None  # (null: parsed whole)


_QUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_COLON: Final = 0x3A
_COMMA: Final = 0x2C
_OPEN_OBJECT: Final = 0x7B
_CLOSE_OBJECT: Final = 0x7D
_OPEN_ARRAY: Final = 0x5B
_SPACE: Final = 0x20
_OPENERS: Final = frozenset({_OPEN_OBJECT, _OPEN_ARRAY})
_MEMBER_MARKS: Final = frozenset({_COLON, _COMMA})

# The next string or bracket; at the level of the response object also "," and ":".
_TOKEN_NESTED: Final = re.compile(rb'["{}\[\]]')
_TOKEN_LEVEL: Final = re.compile(rb'["{}\[\],:]')
# Inside a member: everything but brackets and strings, and short plain strings, in one go
# (a string with escapes or over 256 bytes stops the run and is skipped with bytes.find).
_NESTED_RUN: Final = re.compile(rb'(?:[^"{}\[\]]++|"[^"\\]{0,256}+")*+')
_NOT_BLANK: Final = re.compile(rb"[^ \t\r\n]")

_CAPTURED: Final = frozenset({b"usageMetadata", b"usage_metadata", b"error"})
_MAX_KEY: Final = 16  # longer keys are none of the captured ones
_MAX_FIELD: Final = 16  # longer SSE field names are not "data"
#: Events and bodies up to this size are copied and parsed by json.loads (fastest for small
#: ones); bigger ones are scanned incrementally (fastest for big strings, e.g. base64).
_COPY_LIMIT: Final = 16 * 1024


def _quote_escaped(data: bytes, quote: int, floor: int) -> bool:
    """Whether the quote at ``quote`` is escaped (an odd run of backslashes before it)."""
    k = quote
    while k > floor and data[k - 1] == _BACKSLASH:
        k -= 1
    return (quote - k) % 2 == 1


class _Scanner:
    """Finds the response objects in a JSON byte stream without buffering it.

    Objects at depth ``level`` (1: the top-level value; 2: the elements of a top-level
    array) are response objects; for each one that closes, ``on_object`` gets the raw
    bytes of its ``usageMetadata`` and ``error`` members. Bytes are looked at once; only
    those members (each at most ``max_capture`` bytes) and a short key are kept. Strings
    are skipped with ``bytes.find``, so a megabyte of base64 costs microseconds.
    """

    __slots__ = (
        "_capture",
        "_capture_key",
        "_captures",
        "_key",
        "_key_part",
        "depth",
        "ended",
        "escape",
        "in_object",
        "in_string",
        "level",
        "max_capture",
        "on_object",
        "overflow",
        "trailing",
    )

    def __init__(
        self, level: int, max_capture: int, on_object: Callable[[dict[bytes, bytes]], None]
    ) -> None:
        self.level = level
        self.max_capture = max_capture
        self.on_object = on_object
        self.overflow = False
        self.reset()

    def reset(self) -> None:
        """Forget the current value (a new SSE event)."""
        self.depth = 0
        self.in_string = False
        self.escape = False  # the next byte of the string is escaped
        self.in_object = False
        self.ended = False
        self.trailing = False
        """More than blank space followed the end of the top-level value."""
        self._key: bytes | None = None
        self._key_part: bytearray | None = None
        #: The member being captured (``_capture`` is ``None`` once it outgrew the bound).
        self._capture_key: bytes | None = None
        self._capture: bytearray | None = None
        self._captures: dict[bytes, bytes] = {}

    def feed(self, data: bytes, pos: int, end: int) -> None:
        """Scan ``data[pos:end]``."""
        if self.ended:
            self._after_end(data, pos, end)
            return
        if pos >= end:
            return
        capture_from = pos
        if self.in_string:
            pos = self._string(data, pos, end)
        level = self.level
        while pos < end:
            start = self._next(data, pos, end)
            if start < 0:
                break
            byte = data[start]
            pos = start + 1
            if byte == _QUOTE:
                self.in_string = True
                if self.depth == level:
                    self._key_part = bytearray()
                pos = self._string(data, pos, end)
            elif byte in _MEMBER_MARKS:
                capture_from = self._member(byte, data, capture_from, start)
            elif byte in _OPENERS:
                self._open(byte)
            elif self.depth > 0 and self._close(byte, data, capture_from, start):
                self._after_end(data, pos, end)
                return
        if self._capture_key is not None:
            self._keep(data, capture_from, end)

    def _after_end(self, data: bytes, pos: int, end: int) -> None:
        """Bytes after the top-level value: anything but blank space is trailing."""
        if not self.trailing and _NOT_BLANK.search(data, pos, end) is not None:
            self.trailing = True

    def _next(self, data: bytes, pos: int, end: int) -> int:
        """The position of the next byte that matters, or -1."""
        if self.depth > self.level:  # inside a member: skip to a bracket or a long string
            run = _NESTED_RUN.match(data, pos, end)
            assert run is not None  # the pattern matches the empty string
            return run.end() if run.end() < end else -1
        pattern = _TOKEN_LEVEL if self.depth == self.level else _TOKEN_NESTED
        match = pattern.search(data, pos, end)
        return -1 if match is None else match.start()

    def _member(self, byte: int, data: bytes, capture_from: int, start: int) -> int:
        """A ``:`` or ``,`` at the object's level; where a capture (re)starts."""
        if byte == _COLON:
            if self.in_object and self._key in _CAPTURED:
                self._capture_key = self._key
                self._capture = bytearray()
                capture_from = start + 1
        elif self._capture_key is not None:
            self._end_capture(data, capture_from, start)
        self._key = None
        return capture_from

    def _string(self, data: bytes, pos: int, end: int) -> int:
        """Skip string content from ``pos``; the position after its closing quote or ``end``."""
        if self.escape:
            self.escape = False
            pos += 1
            self._key_part = None  # an escaped key is none of ours
        floor = pos  # backslashes before this point were settled in an earlier piece
        search = pos
        while True:
            quote = data.find(b'"', search, end)
            if quote < 0:
                self.escape = end > floor and _quote_escaped(data, end, floor)
                self._key_bytes(data, pos, end, closed=False)
                return end
            if not _quote_escaped(data, quote, floor):
                self.in_string = False
                self._key_bytes(data, pos, quote, closed=True)
                return quote + 1
            search = quote + 1

    def _key_bytes(self, data: bytes, start: int, stop: int, *, closed: bool) -> None:
        """Collect a string at the object's level: it may be a key."""
        if self.depth != self.level:
            return
        part = self._key_part
        if part is not None and len(part) + stop - start <= _MAX_KEY:
            part += data[start:stop]
        else:
            self._key_part = part = None
        if closed:
            self._key = bytes(part) if part is not None else None
            self._key_part = None

    def _open(self, byte: int) -> None:
        if byte == _OPEN_OBJECT and self.depth == self.level - 1:
            self.in_object = True  # a response object begins
            self._captures = {}
            self._key = None
        self.depth += 1

    def _close(self, byte: int, data: bytes, capture_from: int, start: int) -> bool:
        """A closing bracket at ``start``; ``True`` when the top-level value ended."""
        if self.depth == self.level:
            if self._capture_key is not None:
                self._end_capture(data, capture_from, start)
            if self.in_object:
                self.in_object = False
                if byte == _CLOSE_OBJECT:
                    self.on_object(self._captures)
                self._captures = {}
        self.depth -= 1
        if self.depth == 0:
            self.ended = True
        return self.ended

    def _keep(self, data: bytes, start: int, stop: int) -> None:
        """Add ``data[start:stop]`` to the member being captured (bounded)."""
        capture = self._capture
        if capture is None or stop <= start:
            return
        if len(capture) + stop - start > self.max_capture:
            self.overflow = True
            self._capture = None
            return
        capture += data[start:stop]

    def _end_capture(self, data: bytes, start: int, stop: int) -> None:
        self._keep(data, start, stop)
        if self._capture is not None and self._capture_key is not None:
            self._captures[self._capture_key] = bytes(self._capture)
        self._capture_key = None
        self._capture = None


_UNDECIDED: Final = "undecided"
_NONE: Final = "none"
# SSE line states
_FIELD: Final = 0  # reading the field name
_DATA_SPACE: Final = 1  # after "data:", a space may follow
_DATA: Final = 2  # in a data value
_SKIP: Final = 3  # another field or a comment


@mypyc_attr(allow_interpreted_subclasses=True)
class UsageObserver:
    """Reads Gemini's ``usageMetadata`` from a response body as its chunks pass by.

    The middleware forwards every chunk unchanged and calls :meth:`start` (status and
    ``Content-Type``), :meth:`feed` per chunk and :meth:`finish` after the last one. The
    observer never delays, alters or keeps a chunk. It copies one SSE event (or a JSON
    body) of up to 16 KiB and parses it once with :func:`json.loads`; a bigger event or
    body (long answers, inline images, embeddings) and the JSON-array stream are scanned
    incrementally, keeping only their ``usageMetadata`` and ``error`` members (each at most
    ``max_buffer`` bytes). Memory per response is bounded by ``max_buffer`` plus 16 KiB,
    and each byte is looked at once.

    ``kind``: ``"sse"`` (``data: <json>`` events, CRLF or LF framing), ``"json"`` (one
    ``GenerateContentResponse``), ``"json_array"`` (the stream without ``alt=sse``) or
    ``"auto"`` (``text/event-stream`` or an unknown type is SSE). Whatever the kind, a body
    whose first non-blank byte is ``{`` is read as JSON and one starting with ``[`` as a
    JSON array, so an error answer to a stream request is understood too.

    Attributes:
        tokens: the usage so far per ``count`` (see :func:`usage_tokens`), from the last
            complete event or element that carried ``usageMetadata`` (Gemini's counts are
            cumulative); ``None`` until one was seen. JSON bodies are read at :meth:`finish`.
        usage: that ``usageMetadata`` object.
        events: complete SSE events, array elements or JSON bodies seen.
        error_seen: an event, element or body held ``{"error": ...}``.
        overflow: a ``usageMetadata`` or ``error`` member was over ``max_buffer`` and was
            skipped (or the observer stopped on an internal error): usage may be missing.
        complete: :meth:`finish` was called and the body ended cleanly: SSE on an event
            boundary, a JSON array at its ``]``, a JSON body at its object (blank space
            may follow, nothing else).
    """

    def __init__(
        self,
        kind: Kind = "auto",
        *,
        count: Count = "total",
        max_buffer: int = _DEFAULT_BUFFER,
    ) -> None:
        if kind not in ("json", "sse", "json_array", "auto"):
            raise ValueError(f"unknown kind {kind!r}")
        if count not in COUNTS:
            raise ValueError(f"unknown count {count!r}")
        if max_buffer < 1:
            raise ValueError("max_buffer must be positive")
        self.kind: Kind = kind
        self.count: Count = count
        self.max_buffer = max_buffer
        self._copy_limit = min(max_buffer, _COPY_LIMIT)
        self.status: int | None = None
        self.content_type: str | None = None
        self.tokens: int | None = None
        self.usage: Mapping[str, Any] | None = None
        self.events = 0
        self.error_seen = False
        self._overflow = False
        self._finished = False
        self._parsed_whole = False  # a JSON body that json.loads accepted
        self._mode = _UNDECIDED
        self._scanner: _Scanner | None = None
        self._streaming = False  # the current event or body outgrew the buffer
        self._buffer = bytearray()  # the current SSE event's data, or the JSON body
        self._pending: dict[bytes, bytes] | None = None
        # SSE line state
        self._line_state = _FIELD
        self._line_empty = True
        self._field = bytearray()
        self._data_lines = 0
        self._cr_pending = False

    # -- the middleware's calls

    def start(self, status: int, content_type: str | None) -> None:
        """Note the response status and ``Content-Type`` (from ``http.response.start``)."""
        self.status = status
        self.content_type = content_type

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Look at the next body chunk (never raises, never keeps the chunk)."""
        if self._finished or not chunk or self._mode == _NONE:
            return
        try:
            self._feed(chunk if type(chunk) is bytes else bytes(chunk))
        except Exception:  # a bug must never break the response it watches
            self._fail()

    def finish(self) -> None:
        """The body ended (the last ``http.response.body`` message was sent)."""
        if self._finished:
            return
        self._finished = True
        if self._mode == "json" and not self._streaming:
            raw, self._buffer = self._buffer, bytearray()
            try:
                self._finish_json(raw)
            except Exception:
                self._fail()

    def feed_last(self, chunk: bytes | bytearray | memoryview) -> None:
        """:meth:`feed` the last chunk, then :meth:`finish`.

        A whole JSON body in one chunk (the usual non-streamed answer) is parsed at once,
        without being copied or framed first.
        """
        if (
            self._mode == _UNDECIDED
            and not self._finished
            and type(chunk) is bytes
            and chunk[:1] == b"{"
        ):
            read = _whole_json(chunk, self.max_buffer)
            if read is not None:
                self._mode = "json"
                self._finished = self._parsed_whole = True
                self.events += 1
                self._apply(read[1], read[0])
                return
        self.feed(chunk)
        self.finish()

    @property
    def overflow(self) -> bool:
        """A member over ``max_buffer`` was skipped (or observation stopped)."""
        return self._overflow or (self._scanner is not None and self._scanner.overflow)

    @property
    def complete(self) -> bool:
        """:meth:`finish` was called and the body ended on a clean boundary."""
        if not self._finished:
            return False
        if self._mode == "sse":
            return self._line_empty and self._data_lines == 0
        if self._mode == "json_array" or (self._mode == "json" and self._streaming):
            scanner = self._scanner
            return scanner is not None and scanner.ended and not scanner.trailing
        if self._mode == "json":
            return self._parsed_whole
        return True  # an empty body, or one not watched

    # -- internals

    def _fail(self) -> None:
        logger.exception("usage observer failed; the usage of this response is unknown")
        self._mode = _NONE
        self._overflow = True
        self._buffer = bytearray()

    def _feed(self, chunk: bytes) -> None:
        pos = 0
        if self._mode == _UNDECIDED:
            match = _NOT_BLANK.search(chunk)
            if match is None:
                return  # leading blank lines mean nothing in any of the formats
            pos = match.start()
            self._decide(chunk[pos])
        if self._mode == "sse":
            self._feed_sse(chunk, pos)
        elif self._mode == "json_array":
            assert self._scanner is not None
            self._scanner.feed(chunk, pos, len(chunk))
        elif self._mode == "json":
            self._data(chunk, pos, len(chunk))

    def _decide(self, first: int) -> None:
        if first == _OPEN_OBJECT:
            self._mode = "json"
            self._scanner = _Scanner(1, self.max_buffer, self._apply_captures)
        elif first == _OPEN_ARRAY:
            self._mode = "json_array"
            self._scanner = _Scanner(2, self.max_buffer, self._apply_captures)
        elif self.kind == "sse" or (self.kind == "auto" and self._says_sse()):
            self._mode = "sse"
            self._scanner = _Scanner(1, self.max_buffer, self._hold)
        else:
            self._mode = _NONE

    def _says_sse(self) -> bool:
        if self.content_type is None:
            return True  # unknown: SSE is the only other format Gemini speaks
        media = self.content_type.partition(";")[0].strip().lower()
        return media == "text/event-stream"

    def _data(self, data: bytes, pos: int, end: int) -> None:
        """Bytes of the current SSE event's data or of the JSON body: copy or stream them."""
        if not self._streaming:
            if len(self._buffer) + end - pos <= self._copy_limit:
                self._buffer += data[pos:end]
                return
            self._streaming = True  # too big to copy: read it incrementally from here on
            assert self._scanner is not None
            kept, self._buffer = bytes(self._buffer), bytearray()
            self._scanner.feed(kept, 0, len(kept))
        assert self._scanner is not None
        self._scanner.feed(data, pos, end)

    def _parse_event(self, raw: bytearray) -> bool:
        """Read a whole SSE event; ``False`` if it is too deeply nested for json.loads."""
        if raw.find(b"usage") >= 0 or raw.find(b'"error"') >= 0:  # else it holds neither
            try:
                self._apply_value(_loads(raw))
            except ValueError:
                pass  # not JSON: no usage
            except RecursionError:
                return False
        return True

    def _finish_json(self, raw: bytes | bytearray) -> None:
        try:
            value = _loads(raw)
        except ValueError:
            return
        except RecursionError:  # deep nesting: the scanner has no recursion limit
            if self._scanner is None:
                self._scanner = _Scanner(1, self.max_buffer, self._apply_captures)
            self._streaming = True
            self._scanner.feed(bytes(raw), 0, len(raw))
            return
        self._parsed_whole = True
        self.events += 1
        self._apply_value(value)

    def _apply_value(self, value: Any) -> None:
        if isinstance(value, dict):
            usage = _usage_member(value)
            self._apply(value.get("error") is not None, usage)

    def _apply_captures(self, captures: dict[bytes, bytes]) -> None:
        """A response object closed while reading incrementally: its usage and error."""
        error = captures.get(b"error")
        raw = captures.get(b"usageMetadata", captures.get(b"usage_metadata"))
        usage: Any = None
        if raw is not None:
            try:
                usage = _loads(raw)
            except (ValueError, RecursionError):
                usage = None
        self.events += 1
        self._apply(error is not None and error.strip() != b"null", usage)

    def _apply(self, error: bool, usage: Any) -> None:
        if error:
            self.error_seen = True
        if isinstance(usage, dict):
            tokens = usage_tokens(usage, self.count)
            if tokens is not None:
                self.usage = usage
                self.tokens = tokens

    def _hold(self, captures: dict[bytes, bytes]) -> None:
        """A streamed SSE event's object closed; it counts once the event is dispatched."""
        self._pending = captures

    # -- SSE framing

    def _feed_sse(self, chunk: bytes, pos: int) -> None:
        end = len(chunk)
        if self._cr_pending:
            self._cr_pending = False
            if chunk[pos] == 0x0A:
                pos += 1  # the LF of a CRLF split across chunks
        while pos < end:
            lf = chunk.find(b"\n", pos)
            cr = chunk.find(b"\r", pos, end if lf < 0 else lf)
            stop = lf if cr < 0 else cr
            if stop < 0:
                self._line_bytes(chunk, pos, end)
                return
            if stop > pos:
                self._line_bytes(chunk, pos, stop)
            self._line_end()
            pos = stop + 1
            if cr >= 0:  # CR, CRLF, or a CR whose LF may start the next chunk
                if pos == end:
                    self._cr_pending = True
                elif chunk[pos] == 0x0A:
                    pos += 1

    def _line_bytes(self, data: bytes, pos: int, end: int) -> None:
        self._line_empty = False
        state = self._line_state
        if state == _FIELD:
            colon = data.find(b":", pos, end)
            stop = end if colon < 0 else colon
            if len(self._field) + stop - pos > _MAX_FIELD:
                self._field.clear()
                self._line_state = _SKIP
                return
            self._field += data[pos:stop]
            if colon < 0:
                return
            is_data = self._field == b"data"
            self._field.clear()
            if not is_data:
                self._line_state = _SKIP  # a comment (":"), event, id or retry
                return
            self._data_line()
            state = _DATA_SPACE
            pos = colon + 1
        if state == _DATA_SPACE:
            if pos >= end:
                self._line_state = state
                return
            if data[pos] == _SPACE:
                pos += 1
            state = _DATA
        self._line_state = state
        if state == _DATA and pos < end:
            self._data(data, pos, end)

    def _data_line(self) -> None:
        if self._data_lines:
            self._data(b"\n", 0, 1)  # the data lines of one event join with LF
        self._data_lines += 1

    def _line_end(self) -> None:
        if self._line_empty:
            self._dispatch()
            return
        if self._line_state == _FIELD and self._field == b"data":
            self._data_line()  # "data" without a colon: an empty value
        self._field.clear()
        self._line_state = _FIELD
        self._line_empty = True

    def _dispatch(self) -> None:
        """A blank line: the event is complete."""
        if not self._data_lines:
            return
        self._data_lines = 0
        assert self._scanner is not None
        if not self._streaming:
            raw, self._buffer = self._buffer, bytearray()
            if self._parse_event(raw):
                self.events += 1
                return
            self._scanner.feed(bytes(raw), 0, len(raw))  # too deep for json.loads
        self._streaming = False
        pending, self._pending = self._pending, None
        self._scanner.reset()
        if pending is None:
            self.events += 1  # an event without a JSON object
        else:
            self._apply_captures(pending)
