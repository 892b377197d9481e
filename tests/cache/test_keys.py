"""Canonical key parts: JSON bodies, query strings, framing, owners and tags; stored
entries; the HTTP caching rules (table-driven)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest

from gemini_scale.caching import StoredResponse, model_tag, principal_tag, tenant_tag
from gemini_scale.caching.entry import CorruptEntryError
from gemini_scale.caching.keys import (
    ALL_TAG,
    UNPARSED,
    BodyDigests,
    canonical_json,
    canonical_query,
    frame,
    owner_tag,
)
from gemini_scale.caching.request import generation_allowed, header_fields, is_deterministic
from gemini_scale.caching.semantics import (
    RequestDirectives,
    etag_matches,
    etag_of,
    private_headers,
    replayable,
    response_facts,
)
from gemini_scale.principal import Principal

ALLOWED = frozenset({b"alt", b"pageSize", b"pageToken"})


def digest(body: Any) -> bytes | None:
    return BodyDigests().digest(json.dumps(body).encode(), body)


# -- canonical JSON (research/security.md C09) ---------------------------------------------


def test_member_order_whitespace_and_spelling_do_not_change_the_key() -> None:
    one = {"contents": [{"parts": [{"text": "hi"}]}],
           "generationConfig": {"temperature": 0, "maxOutputTokens": 20}}
    two = {"generation_config": {"max_output_tokens": 20.0, "temperature": 0.0},
           "contents": [{"parts": [{"text": "hi"}]}]}
    assert canonical_json(one) == canonical_json(two)
    assert digest(one) == digest(two)


@pytest.mark.parametrize(
    "change",
    [
        {"generationConfig": {"temperature": 0.5}},
        {"generationConfig": {"temperature": 0, "seed": 7}},
        {"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "OFF"}]},
        {"systemInstruction": {"parts": [{"text": "be terse"}]}},
        {"tools": [{"functionDeclarations": [{"name": "f"}]}]},
        {"contents": [{"parts": [{"text": "Hi"}]}]},
    ],
)
def test_every_semantic_difference_gives_another_key(change: dict[str, Any]) -> None:
    base = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0}}
    assert digest(base) != digest({**base, **change})


def test_user_named_members_keep_their_spelling() -> None:
    """JSON-schema ``properties`` and function-call ``args`` are the user's names."""
    for outer, inner in (("properties", "user_id"), ("args", "user_id"), ("response", "a_b")):
        snake = {"x": {outer: {inner: 1}}}
        camel = {"x": {outer: {inner.split("_")[0] + inner.split("_")[1].title(): 1}}}
        assert canonical_json(snake) != canonical_json(camel)


def test_a_body_with_both_spellings_is_keyed_as_written() -> None:
    both = {"generationConfig": {"temperature": 0}, "generation_config": {"temperature": 1}}
    swapped = {"generationConfig": {"temperature": 1}, "generation_config": {"temperature": 0}}
    assert canonical_json(both) != canonical_json(swapped)
    assert canonical_json(both) != canonical_json({"generationConfig": {"temperature": 0}})


REPEATS = [  # a body repeating a member name, and one without the repeat
    (b'{"contents": [{"parts": [{"text": "x"}]}], "contents": [{"parts": [{"text": "a"}]}]}',
     b'{"contents": [{"parts": [{"text": "a"}]}]}'),
    (b'{"generationConfig": {"temperature": 1, "temperature": 0}}',
     b'{"generationConfig": {"temperature": 0}}'),
    (b'{"contents": [{"parts": [{"functionCall": {"args": {"x": 1, "x": 2}}}]}]}',
     b'{"contents": [{"parts": [{"functionCall": {"args": {"x": 2}}}]}]}'),
    (b'{"a": {"a": 1}, "b": [{"a": 1}, {"a": 1, "a": 1}]}',  # even with the same value
     b'{"a": {"a": 1}, "b": [{"a": 1}, {"a": 1}]}'),
    (b'{"t": "a: b", "x:y": ":", "t": "c"}', b'{"x:y": ":", "t": "c"}'),
    # An escaped colon balances the repeat in a count of colons: parsed again.
    (b'{"s": "\\u003a", "a": 1, "a": 2}', b'{"s": "\\u003a", "a": 2}'),
    (b'{"s": "\\u003A", "s": "\\\\u003a:"}', b'{"s": "\\\\u003a:"}'),
    ('{"s": "\\u003a", "a": 1, "a": 2}'.encode("utf-16"),
     '{"s": "\\u003a", "a": 2}'.encode("utf-16")),
]


@pytest.mark.parametrize(("repeated", "single"), REPEATS)
def test_a_body_that_repeats_a_member_name_is_not_keyed(repeated: bytes, single: bytes) -> None:
    """Python keeps the last of repeated members, a proto3 reader refuses the body: it
    must never share the key of the body without the repeat (security.md C09)."""
    for raw in (repeated, single):
        parsed = json.loads(raw)
        assert json.loads(single) == parsed
        found = BodyDigests().facts(raw)
        assert BodyDigests().facts(raw, parsed) == found  # an outer layer's reading too
        assert (found is None) is (raw is repeated)


@pytest.mark.parametrize("name", ["generation__config", "generation_config_", "generation_Config"])
def test_a_spelling_proto3_json_does_not_read_as_the_field_has_its_own_key(name: str) -> None:
    contents = [{"parts": [{"text": "hi"}]}]
    camel = {"contents": contents, "generationConfig": {"temperature": 0}}
    snake = {"contents": contents, "generation_config": {"temperature": 0}}
    odd = {"contents": contents, name: {"temperature": 0}}
    assert digest(snake) == digest(camel)
    assert digest(odd) != digest(camel)


def test_too_deep_bodies_are_not_keyed() -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    assert BodyDigests().digest(b"[...]", deep) is None


def test_digests_are_remembered_by_raw_body() -> None:
    digests = BodyDigests(size=2)
    body = {"a": 1}
    first = digests.digest(b'{"a": 1}', body)
    assert digests.digest(b'{"a": 1}', {"ignored": "the raw bytes decide"}) == first
    for raw in (b"1", b"2", b"3"):  # bounded
        digests.digest(raw, int(raw))
    assert digests.digest(b"", None) == b""


@pytest.mark.parametrize("size", [9, 32, 1024, 1025, 5000])
def test_remembered_digests_of_every_body_size(size: int) -> None:
    """Small bodies are remembered by their bytes, large ones (and 32-byte ones, the size of
    a SHA-256) by their SHA-256: a repeated body of any size gets its first digest, and two
    bodies never share one."""
    one, other = (b'{"t":"' + letter * (size - 8) + b'"}' for letter in (b"a", b"b"))
    assert len(one) == size
    digests = BodyDigests()
    first = digests.digest(one, UNPARSED)
    assert first is not None
    assert digests.digest(one, UNPARSED) == first == BodyDigests().digest(one, UNPARSED)
    assert digests.digest(other, UNPARSED) not in (None, first)


# -- query (C11) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", b""),
        (b"alt=sse", b"alt=sse"),
        (b"pageToken=b&alt=sse", b"alt=sse&pageToken=b"),
        (b"alt=sse&key=SECRET", b"alt=sse"),
        (b"key=SECRET", b""),
        (b"alt=sse&&", b"alt=sse"),
        (b"pageToken=2&pageToken=1", b"pageToken=2&pageToken=1"),  # order kept: it matters
        (b"cb=123", None),  # a cache buster: not cached at all
        (b"%24alt=json", None),  # $alt (GAPIC enum encoding) changes the answer
        (b"alt%3D=x", None),
        (b"k%65y=SECRET&alt=sse", b"\x00alt=sse"),  # escaped names are decoded like the app
    ],
)
def test_canonical_query(query: bytes, expected: bytes | None) -> None:
    assert canonical_query(query, ALLOWED) == expected


def test_every_parameter_is_keyed_without_an_allow_list() -> None:
    assert canonical_query(b"cb=1&alt=sse&key=x", None) == b"alt=sse&cb=1"
    assert canonical_query(b"cb=1", None) != canonical_query(b"cb=2", None)


def test_frames_cannot_be_forged_by_moving_bytes_between_parts() -> None:
    assert frame([b"ab", b"c"]) != frame([b"a", b"bc"])
    assert frame([b"a\x00", b""]) != frame([b"a", b"\x00"])


# -- owners and tags (C01-C03) -------------------------------------------------------------


def test_owners() -> None:
    alice = Principal(issuer="https://a/", subject="alice", tenant="acme")
    same_sub_other_issuer = Principal(issuer="https://b/", subject="alice", tenant="acme")
    assert owner_tag("shared", None) == ALL_TAG
    assert owner_tag("principal", None) is None
    assert owner_tag("tenant", None) is None
    assert owner_tag("principal", alice) == principal_tag(alice)
    assert owner_tag("principal", alice) != owner_tag("principal", same_sub_other_issuer)
    colleague = Principal(issuer="https://a/", subject="carol", tenant="acme")
    assert owner_tag("tenant", alice) == tenant_tag("https://a/", "acme") == owner_tag(
        "tenant", colleague
    )
    # Another issuer's "acme" is another tenant: it cannot read this one's entries.
    assert owner_tag("tenant", alice) != owner_tag("tenant", same_sub_other_issuer)
    loner = Principal(issuer="https://a/", subject="bob")
    assert owner_tag("tenant", loner) == principal_tag(loner)  # never shared by tenant-less
    assert model_tag("models/Gemini-2.5-Flash") == model_tag("gemini-2.5-flash")


# -- stored entries (C20, C22) -------------------------------------------------------------


def test_entries_round_trip() -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"x-empty", b""), (b"vary", b"Origin")]
    entry = StoredResponse.build(headers, b"data: {}\r\n\r\n", created=10.5, ttl=60)
    decoded = StoredResponse.decode(entry.encode())
    assert decoded == entry
    assert decoded.expires == 70.5
    assert dict(decoded.headers)[b"etag"] == etag_of(b"data: {}\r\n\r\n")
    assert dict(decoded.headers)[b"content-length"] == b"12"
    assert decoded.hit_headers[-1] == (b"cache-status", b"gemini-scale; hit")


def test_an_entry_keeps_the_age_its_answer_arrived_with() -> None:
    entry = StoredResponse.build([(b"a", b"b")], b"body", created=10.0, ttl=60, initial_age=100)
    raw = entry.encode()
    assert raw[:4] == b"GSC2"
    assert len(raw) == entry.size
    decoded = StoredResponse.decode(raw)
    assert decoded == entry
    assert (decoded.initial_age, decoded.age(15.0), decoded.age(5.0)) == (100, 105, 100)


def test_an_entry_without_an_initial_age_keeps_the_first_layout() -> None:
    # What releases before the initial age wrote (and still read): GSC1, no age.
    entry = StoredResponse.build([(b"a", b"b")], b"body", created=10.0, ttl=60)
    raw = entry.encode()
    assert raw[:4] == b"GSC1"
    assert len(raw) == entry.size
    assert StoredResponse.decode(raw).initial_age == 0
    assert StoredResponse.decode(raw).age(12.5) == 2.5


@pytest.mark.parametrize("age", [-1.0, math.nan, math.inf])
def test_an_entry_with_an_impossible_age_is_refused(age: float) -> None:
    raw = StoredResponse.build([(b"a", b"b")], b"body", created=1, ttl=1, initial_age=5).encode()
    mangled = raw[:20] + struct.pack("!d", age) + raw[28:]
    with pytest.raises(CorruptEntryError):
        StoredResponse.decode(mangled)


@pytest.mark.parametrize("mangle", [lambda raw: raw[:-1], lambda raw: raw + b"x",
                                    lambda raw: b"GSC0" + raw[4:], lambda raw: raw[:20],
                                    lambda raw: b""])
def test_corrupt_entries_are_refused(mangle: Any) -> None:
    raw = StoredResponse.build([(b"a", b"b")], b"body", created=1, ttl=1).encode()
    with pytest.raises(CorruptEntryError):
        StoredResponse.decode(mangle(raw))


def test_hop_by_hop_and_per_exchange_fields_are_not_replayed() -> None:
    headers = [
        (b"connection", b"x-foo, close"), (b"x-foo", b"1"), (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"), (b"proxy-authenticate", b"Basic"),
        (b"set-cookie", b"s=1"), (b"server-timing", b"db;dur=53"), (b"content-length", b"99"),
        (b"x-request-id", b"r1"), (b"content-type", b"application/json"), (b"x-kept", b"yes"),
    ]
    assert replayable(headers) == [(b"content-type", b"application/json"), (b"x-kept", b"yes")]


# -- HTTP rules (C04-C07, C12, C19, C23) ---------------------------------------------------


VARY = frozenset({b"accept-encoding", b"origin"})


@pytest.mark.parametrize(
    ("status", "headers", "storable"),
    [
        (200, [], math.inf),
        (200, [(b"cache-control", b"max-age=600")], 600),
        (200, [(b"cache-control", b"public, s-maxage=30, max-age=600")], 30),
        (200, [(b"cache-control", b"max-age=0")], 0),
        (200, [(b"cache-control", b"no-store")], 0),
        (200, [(b"cache-control", b"no-store, max-age=600")], 0),
        (200, [(b"cache-control", b"private, max-age=600")], 0),
        (200, [(b"cache-control", b"no-cache")], 0),
        (200, [(b"cache-control", b'private="set-cookie"')], 0),
        (200, [(b"set-cookie", b"s=1"), (b"cache-control", b"max-age=600")], 0),
        (200, [(b"vary", b"*")], 0),
        (200, [(b"vary", b"Accept-Encoding, origin")], math.inf),
        (200, [(b"vary", b"X-Unlisted")], 0),
        *[(status, [(b"cache-control", b"max-age=600")], 0)
          for status in (201, 203, 206, 304, 400, 404, 429, 500, 503)],
    ],
)
def test_what_may_be_stored(
    status: int, headers: list[tuple[bytes, bytes]], storable: float
) -> None:
    assert response_facts(status, headers, VARY, 0.0)[0] == storable



#: Sun, 06 Nov 1994 08:49:37 GMT, and that date a minute later in RFC 9110's three formats.
NOW = 784111777.0
DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"
LATER = (b"Sun, 06 Nov 1994 08:50:37 GMT", b"Sunday, 06-Nov-94 08:50:37 GMT",
         b"Sun Nov  6 08:50:37 1994")


@pytest.mark.parametrize(
    ("headers", "storable"),
    [
        # RFC 9111 §5.3: an invalid Expires ("0" above all) is already expired.
        ([(b"expires", b"0")], 0),
        ([(b"expires", b"-1")], 0),
        ([(b"expires", b"soon")], 0),
        ([(b"expires", b"Sun, 06 Nov 99999 08:50:37 GMT")], 0),
        ([(b"expires", b"Thu, 01 Jan 1970 00:00:00 GMT")], 0),
        ([(b"expires", DATE)], 0),
        ([(b"expires", LATER[0]), (b"cache-control", b"public")], 60),
        *[([(b"expires", later)], 60) for later in LATER],
        ([(b"expires", LATER[0]), (b"expires", LATER[0])], 60),
        ([(b"expires", LATER[0]), (b"expires", DATE)], 0),  # they disagree: invalid
        # Its lifetime counts from the answer's Date, whatever this clock says.
        ([(b"date", b"Sun, 06 Nov 1994 08:40:37 GMT"), (b"expires", LATER[0])], 600),
        ([(b"date", b"yesterday"), (b"expires", LATER[0])], 60),
        ([(b"expires", LATER[0]), (b"age", b"20")], 40),
        ([(b"expires", LATER[0]), (b"age", b"60")], 0),
        # A max-age or s-maxage wins over any Expires.
        ([(b"expires", b"0"), (b"cache-control", b"max-age=600")], 600),
        ([(b"cache-control", b"s-maxage=30"), (b"expires", DATE)], 30),
        ([(b"expires", LATER[0]), (b"cache-control", b"max-age=600")], 600),
        ([(b"expires", LATER[0]), (b"cache-control", b"no-store")], 0),
        ([(b"expires", LATER[0]), (b"set-cookie", b"s=1")], 0),
    ],
)
def test_what_expires_allows(headers: list[tuple[bytes, bytes]], storable: float) -> None:
    assert response_facts(200, headers, VARY, NOW)[0] == storable

@pytest.mark.parametrize(
    ("headers", "age", "storable"),
    [
        ([(b"age", b"8"), (b"cache-control", b"max-age=10")], 8, 2),
        ([(b"age", b"12"), (b"cache-control", b"max-age=10")], 12, 0),
        ([(b"age", b"8, 3")], 8, math.inf),  # RFC 9111 §5.1: the first member
        ([(b"age", b"8"), (b"age", b"3")], 8, math.inf),
        ([(b"age", b"x")], 0, math.inf),  # invalid: ignored
        ([(b"age", b"9" * 40), (b"cache-control", b"max-age=600")], 2**31, 0),
    ],
)
def test_the_age_an_answer_arrived_with(
    headers: list[tuple[bytes, bytes]], age: int, storable: float
) -> None:
    facts = response_facts(200, headers, VARY, 0.0)
    assert (facts[0], facts[5]) == (storable, age)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, RequestDirectives()),
        (b"no-cache", RequestDirectives(no_cache=True)),
        (b"No-Store", RequestDirectives(no_store=True)),
        (b"max-age=0", RequestDirectives(no_cache=True, max_age=0)),
        (b"max-age=5, only-if-cached", RequestDirectives(only_if_cached=True, max_age=5)),
        (b'max-age="7"', RequestDirectives(max_age=7)),
        (b"max-age=x", RequestDirectives()),
    ],
)
def test_request_directives(value: bytes | None, expected: RequestDirectives) -> None:
    assert RequestDirectives.parse(value) == expected


def test_private_marking_keeps_no_store() -> None:
    assert private_headers([(b"cache-control", b"public, max-age=9"), (b"a", b"b")]) == [
        (b"a", b"b"), (b"cache-control", b"private")]
    kept = [(b"cache-control", b"no-store")]
    assert private_headers(kept) == kept


def test_entity_tags() -> None:
    etag = etag_of(b"x")
    assert etag.startswith(b'"')
    assert etag.endswith(b'"')
    assert etag == etag_of(b"x")
    assert etag_matches(b"*", etag)
    assert etag_matches(b'"nope", W/' + etag, etag)
    assert not etag_matches(b'"nope"', etag)


def test_header_fields_join_repeated_lines() -> None:
    assert header_fields([(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]) == {b"a": b"1,3", b"b": b"2"}
    assert header_fields(((b"a", b"1"),)) == {b"a": b"1"}


@pytest.mark.parametrize(
    ("body", "deterministic"),
    [
        ({"generationConfig": {"temperature": 0}}, True),
        ({"generation_config": {"temperature": 0.0, "candidate_count": 1}}, True),
        ({"generationConfig": {"temperature": 0, "candidateCount": 2}}, False),
        ({"generationConfig": {"temperature": 0.1}}, False),
        ({"generationConfig": {"temperature": False}}, False),
        ({"generationConfig": {}}, False),  # Gemini's default temperature is 1
        ({}, False),
        (None, False),
    ],
)
def test_determinism(body: Any, deterministic: bool) -> None:
    assert is_deterministic(body) is deterministic
    path = "/v1beta/models/m:generateContent"
    assert generation_allowed(path, body, "deterministic") is deterministic
    assert generation_allowed(path, body, "all") is True
    assert generation_allowed(path, body, "off") is False
    for other in ("/v1beta/models/m:countTokens", "/v1beta/models/m:batchEmbedContents"):
        assert generation_allowed(other, body, "off") is True
