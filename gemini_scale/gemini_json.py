"""Gemini's JSON spelling rules, shared by the cache keys and the version shims.

Gemini reads request bodies with the proto3 JSON mapping: a member may be spelled in
lowerCamelCase (``generationConfig``) or as the proto field name (``generation_config``),
and ``20.0`` is read as ``20`` in an integer field (research/gemini-api.md §1.9). Members
*below* some fields are named by the user, not by the proto (JSON Schema ``properties``,
function-call ``args``): their spelling is data and must never change.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from gemini_scale import fastjson
from gemini_scale.memo import remember

__all__ = [
    "EVENT_END",
    "INTEGER_MEMBERS",
    "LINE_END",
    "OPAQUE_MEMBERS",
    "AmbiguousSpellingError",
    "NonFiniteNumberError",
    "camel_name",
    "dump_json",
    "may_respell",
    "normalize",
    "respelled",
    "sse_payload",
    "stream_chunks",
]

#: JSON members whose contents are user-named (JSON Schema ``properties``, function-call
#: ``args`` and responses, ``labels`` maps, raw JSON Schemas, and the ``Struct``/``Value``
#: members ``partMetadata``, a schema's ``default`` and ``example``): below them member
#: names keep their spelling.
OPAQUE_MEMBERS: Final = frozenset(
    {
        "args",
        "response",
        "properties",
        "labels",
        "partMetadata",
        "default",
        "example",
        "responseJsonSchema",
        "_responseJsonSchema",
        "parametersJsonSchema",
        "responseJsonSchemaOrdered",
    }
)

#: Integer members of Gemini requests: a client may send ``20.0`` for them (proto3 JSON
#: reads it as ``20``), and the head gets ``20``. Other numbers are left as they are.
INTEGER_MEMBERS: Final = frozenset(
    {
        "maxOutputTokens",
        "candidateCount",
        "topK",
        "seed",
        "thinkingBudget",
        "outputDimensionality",
        "logprobs",
    }
)

_MEMO_SIZE: Final = 4096
_MEMO_NAME_MAX: Final = 64
_INT_LIMIT: Final = 2**53
_camel_memo: dict[str, str] = {}
#: A proto field name with ``_``: what proto3 JSON reads beside its lowerCamelCase json_name.
_FIELD_NAME: Final = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


class AmbiguousSpellingError(ValueError):
    """One object spells a member both ways (``generationConfig`` and ``generation_config``)."""

    @property
    def message(self) -> str:
        """The client's 400, as Google words a duplicate member."""
        return f'Invalid JSON payload received. Duplicate field "{self}".'


def camel_name(name: str) -> str:
    """``generation_config`` -> ``generationConfig``: the json_name proto3 JSON reads beside
    it. Only a proto field name is respelled (lower-case letters and digits, words joined by
    single ``_``); any other name (``generation__config``, ``generation_Config``, a leading
    or trailing ``_``) is not one, and is returned as written, as is a name without ``_``."""
    if "_" not in name:
        return name
    found = _camel_memo.get(name)
    if found is None:
        found = name
        if _FIELD_NAME.fullmatch(name) is not None:
            head, *rest = name.split("_")
            found = head + "".join(part[0].upper() + part[1:] for part in rest)
        if len(name) <= _MEMO_NAME_MAX:  # hostile bodies must not fill the memo with megabytes
            remember(_camel_memo, name, found, _MEMO_SIZE)
    return found


def normalize(value: Any, opaque: bool = False, integer: bool = False) -> tuple[Any, bool]:
    """``value`` as Gemini's head expects it, and whether anything changed: every proto
    member name spelled camelCase and integral floats (``20.0``) in
    :data:`INTEGER_MEMBERS` as integers, except below :data:`OPAQUE_MEMBERS`. Unchanged
    parts are the same objects. Raises :class:`AmbiguousSpellingError` when one object
    spells a member both ways and :class:`RecursionError` for absurd nesting."""
    kind = type(value)
    if kind is dict:
        changed = False
        out: dict[str, Any] = {}
        for name, item in value.items():
            key = name if opaque else camel_name(name)
            if key in out:
                raise AmbiguousSpellingError(key)
            new, inner = normalize(
                item, opaque or key in OPAQUE_MEMBERS, not opaque and key in INTEGER_MEMBERS
            )
            out[key] = new
            changed = changed or inner or key is not name
        return (out, True) if changed else (value, False)
    if kind is list:
        changed = False
        items = []
        for item in value:
            new, inner = normalize(item, opaque)
            items.append(new)
            changed = changed or inner
        return (items, True) if changed else (value, False)
    if kind is float and integer and value.is_integer() and abs(value) < _INT_LIMIT:
        return int(value), True
    return value, False


#: A member name with ``_`` (``"generation_config":``), or an integer member sent with a
#: fraction (``"maxOutputTokens": 20.0``): a body with neither is already spelled as the
#: head wants it. Either may match inside a string: that only costs a parse.
_SNAKE_MEMBER: Final = re.compile(rb'_[A-Za-z0-9_]*"\s*:')
_FRACTIONAL_INTEGERS: Final = tuple(
    (name.encode(), re.compile(b'"' + name.encode() + rb'"\s*:\s*-?\d+\.'))
    for name in sorted(INTEGER_MEMBERS)
)
# allow_nan=False: a number past a double's range (``1e400``) parses into ``inf``, which
# the encoder would write as ``Infinity``: not JSON, and not what the client sent.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_PRETTY: Final = json.JSONEncoder(indent=2, ensure_ascii=False, allow_nan=False)


class NonFiniteNumberError(ValueError):
    """A value holds ``NaN`` or an infinity, which JSON cannot write: a client's ``1e400``
    (past a double's range) or its ``NaN`` / ``Infinity`` tokens, as parsed."""


def dump_json(value: Any, *, pretty: bool = False) -> bytes:
    """``value`` as UTF-8 JSON (compact, or indented by 2). A string with a lone surrogate
    (``"\\ud800"`` parses into one) cannot be UTF-8: that code point alone is written as
    its ``\\u`` escape, as the client sent it. Raises :class:`NonFiniteNumberError` for
    ``NaN`` and infinities, never writing them as the non-JSON ``NaN`` / ``Infinity``."""
    try:
        text = (_PRETTY if pretty else _COMPACT).encode(value)
    except ValueError as exc:
        if "Out of range float" not in str(exc):  # (a circular reference, say)
            raise
        raise NonFiniteNumberError(str(exc)) from None
    # Only a lone surrogate fails to encode, and only inside a string, where Python's
    # backslashreplace writes exactly JSON's escape for it (a backslash before it in the
    # string is already doubled by the encoder).
    return text.encode("utf-8", "backslashreplace")


#: Where an SSE event ends, and where a line does (the three line ends SSE allows).
EVENT_END: Final = re.compile(rb"\r\n\r\n|\n\n|\r\r")
LINE_END: Final = re.compile(rb"\r\n|\n|\r")


def sse_payload(lines: list[bytes]) -> bytes | None:
    """The data of one SSE event, given its lines: its ``data:`` lines joined by ``\\n``
    (one leading space dropped from each), or ``None`` when it has none."""
    data = [line for line in lines if line.startswith(b"data:")]
    if not data:
        return None
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in data)


def stream_chunks(body: bytes) -> list[Any] | None:
    """The JSON chunks of a whole ``streamGenerateContent`` answer: the elements of its
    JSON-array form, or each SSE event's data; ``None`` when one of them does not parse."""
    try:
        if body.lstrip()[:1] == b"[":
            chunks = fastjson.loads(body)
            return chunks if type(chunks) is list else None
        found = []
        for event in EVENT_END.split(body):
            payload = sse_payload(LINE_END.split(event))
            if payload is not None:
                found.append(fastjson.loads(payload))
        return found
    except (ValueError, RecursionError):
        return None


def may_respell(raw: bytes) -> bool:
    """Whether :func:`normalize` might change the JSON body ``raw`` (a cheap, conservative
    test on the bytes: ``False`` means certainly not)."""
    if raw.find(b"_") >= 0 and _SNAKE_MEMBER.search(raw) is not None:
        return True
    return any(
        raw.find(name) >= 0 and pattern.search(raw) is not None
        for name, pattern in _FRACTIONAL_INTEGERS
    )


def respelled(raw: bytes) -> bytes:
    """The JSON body ``raw`` :func:`normalize`-d, or ``raw`` itself when nothing changes or
    it is not a JSON object (whoever reads it judges it as it is). Raises
    :class:`AmbiguousSpellingError` for an object that spells a member both ways: which of
    the two a reader would take is not known, so it must not go on as it is."""
    if not raw or not may_respell(raw):
        return raw
    try:
        body = fastjson.loads(raw)
        if type(body) is not dict:
            return raw
        value, changed = normalize(body)
        return dump_json(value) if changed else raw
    except AmbiguousSpellingError:
        raise
    except (ValueError, RecursionError):  # (NonFiniteNumberError is a ValueError)
        return raw
