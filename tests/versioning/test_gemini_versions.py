"""Gemini's /v1 and /v1beta from one head, and the shims old clients need, through the
example gateway (research/gemini-api.md §5.2; research/security.md D13, D14)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx
import pytest

from example_app.standin import ReceivedRequest, create_standin
from tests.cache.support import call
from tests.gateway import build, running

GENERATE = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}


@dataclass
class Gateway:
    client: httpx.AsyncClient
    received: list[ReceivedRequest]
    app: object

    def paths(self) -> list[str]:
        return [r.path for r in self.received]


async def _gateway(env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    received: list[ReceivedRequest] = []
    app = build({"GEMINI_SCALE_CACHE_TTL": "0", **(env or {})},
                standin=create_standin(received=received))
    async with running(app) as client:
        yield Gateway(client, received, app)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async for found in _gateway():
        yield found


@pytest.fixture
async def strict() -> AsyncIterator[Gateway]:
    async for found in _gateway({"GEMINI_SCALE_STRICT_V1": "1"}):
        yield found


async def test_v1_and_v1beta_are_served_by_one_head(gateway: Gateway) -> None:
    v1 = await gateway.client.post("/v1/models/gemini-2.5-flash:generateContent", json=GENERATE)
    beta = await gateway.client.post(
        "/v1beta/models/gemini-2.5-flash:generateContent", json=GENERATE
    )
    assert v1.status_code == beta.status_code == 200
    assert v1.json() == beta.json()
    assert gateway.paths() == ["/v1beta/models/gemini-2.5-flash:generateContent"] * 2
    listed = await gateway.client.get("/v1/models")
    assert listed.status_code == 200
    assert listed.json()["models"]
    assert gateway.paths()[-1] == "/v1beta/models"


@pytest.mark.parametrize("prefix", ["/v1", "/v1beta"])
async def test_both_spellings_accepted_and_forwarded_as_camel_case(
    gateway: Gateway, prefix: str
) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generation_config": {"max_output_tokens": 20.0, "temperature": 0.5, "top_p": 1.0},
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "tools": [{"function_declarations": [{
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}},
        }]}],
    }
    response = await gateway.client.post(
        f"{prefix}/models/gemini-2.5-flash:generateContent", json=body
    )
    assert response.status_code == 200, response.text
    sent = json.loads(gateway.received[-1].body)
    assert sent["generationConfig"] == {"maxOutputTokens": 20, "temperature": 0.5, "topP": 1.0}
    assert type(sent["generationConfig"]["topP"]) is float
    assert type(sent["generationConfig"]["maxOutputTokens"]) is int
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    declaration = sent["tools"][0]["functionDeclarations"][0]
    assert declaration["parameters"]["properties"] == {"user_id": {"type": "string"}}
    assert "generation_config" not in sent
    assert "system_instruction" not in sent


@pytest.mark.parametrize("prefix", ["/v1", "/v1beta"])
async def test_one_object_spelling_a_member_both_ways_is_400(
    gateway: Gateway, prefix: str
) -> None:
    """Which of the two spellings a reader takes is unknown (the cache reads one, Google
    perhaps the other): refused on the head as on /v1, never forwarded nor stored."""
    body = {**GENERATE, "generationConfig": {"temperature": 0},
            "generation_config": {"temperature": 1.5}}
    for _ in range(2):
        response = await gateway.client.post(
            f"{prefix}/models/gemini-2.5-flash:generateContent", json=body
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert error["message"] == (
            'Invalid JSON payload received. Duplicate field "generationConfig".'
        )
        assert "hit" not in response.headers.get("cache-status", "")
    assert gateway.received == []


async def test_strict_v1_refuses_v1beta_only_members_as_google_did(strict: Gateway) -> None:
    body = {
        "contents": [{"role": "user", "parts": [
            {"text": "hi"}, {"functionCall": {"name": "f", "args": {}}}
        ]}],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}},
    }
    response = await strict.client.post("/v1/models/gemini-2.5-flash:generateContent", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    expected = [
        'Invalid JSON payload received. Unknown name "system_instruction": Cannot find field.',
        'Invalid JSON payload received. Unknown name "thinkingConfig" at '
        "'generation_config': Cannot find field.",
        'Invalid JSON payload received. Unknown name "functionCall" at '
        "'contents[0].parts[1]': Cannot find field.",
    ]
    assert error["message"] == "\n".join(expected)
    assert error["status"] == "INVALID_ARGUMENT"
    violations = error["details"][0]["fieldViolations"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["description"] for v in violations] == expected
    assert violations[1]["field"] == "generation_config"
    assert strict.received == []
    # The same body is fine on v1beta, and a plain v1 request is fine too.
    beta = await strict.client.post(
        "/v1beta/models/gemini-2.5-flash:generateContent", json=body
    )
    assert beta.status_code == 200
    plain = await strict.client.post("/v1/models/gemini-2.5-flash:generateContent", json=GENERATE)
    assert plain.status_code == 200


async def test_strict_v1_checks_count_tokens_inner_request(strict: Gateway) -> None:
    body = {"generateContentRequest": {**GENERATE, "tools": []}}
    response = await strict.client.post("/v1/models/gemini-2.5-flash:countTokens", json=body)
    assert response.status_code == 400
    assert "'generate_content_request'" in response.json()["error"]["message"]


async def test_retired_model_is_served_by_its_successor_with_headers(gateway: Gateway) -> None:
    response = await gateway.client.post(
        "/v1/models/gemini-1.5-flash:generateContent", json=GENERATE
    )
    assert response.status_code == 200
    assert gateway.paths() == ["/v1beta/models/gemini-2.5-flash:generateContent"]
    deprecation = response.headers["deprecation"]
    assert deprecation.startswith("@")
    assert int(deprecation[1:]) == int(
        dt.datetime(2025, 4, 29, tzinfo=dt.UTC).timestamp()
    )
    assert parsedate_to_datetime(response.headers["sunset"]) == dt.datetime(
        2025, 9, 24, tzinfo=dt.UTC
    )
    # The successor in the client's own version, not the head's.
    assert response.headers["link"] == '</v1/models/gemini-2.5-flash>; rel="successor-version"'
    on_head = await gateway.client.post(
        "/v1beta/models/gemini-1.5-flash:generateContent", json=GENERATE
    )
    assert on_head.headers["link"] == (
        '</v1beta/models/gemini-2.5-flash>; rel="successor-version"'
    )
    current = await gateway.client.post(
        "/v1/models/gemini-2.5-flash:generateContent", json=GENERATE
    )
    assert "deprecation" not in current.headers
    assert "link" not in current.headers


@pytest.mark.parametrize("member", ["generateContentRequest", "generate_content_request"])
async def test_retired_model_in_a_count_tokens_body_is_mapped(
    gateway: Gateway, member: str
) -> None:
    body = {member: {"model": "models/gemini-pro", **GENERATE}}
    response = await gateway.client.post("/v1beta/models/gemini-pro:countTokens", json=body)
    assert response.status_code == 200, response.text
    assert gateway.paths() == ["/v1beta/models/gemini-2.5-pro:countTokens"]
    sent = json.loads(gateway.received[-1].body)
    assert sent["generateContentRequest"]["model"] == "models/gemini-2.5-pro"


async def test_legacy_alt_parameter_is_removed() -> None:
    async for gateway in _gateway({"GEMINI_SCALE_CACHE_TTL": "60"}):
        path = "/v1beta/models/gemini-2.5-flash:countTokens"
        query = {"$alt": "json;enum-encoding=int"}
        first = await gateway.client.post(path, params=query, json=GENERATE)
        second = await gateway.client.post(path, params=query, json=GENERATE)
        assert first.status_code == second.status_code == 200
        assert len(gateway.received) == 1  # the parameter no longer defeats the cache
        assert all(name != "$alt" for name, _ in gateway.received[0].query)
        assert "hit" in second.headers["cache-status"]


async def test_one_cache_entry_serves_every_version() -> None:
    async for gateway in _gateway({"GEMINI_SCALE_CACHE_TTL": "60"}):
        v1 = await gateway.client.post("/v1/models/gemini-2.5-flash:countTokens", json=GENERATE)
        beta = await gateway.client.post(
            "/v1beta/models/gemini-2.5-flash:countTokens", json=GENERATE
        )
        assert v1.json() == beta.json()
        assert "hit" in beta.headers["cache-status"]
        assert len(gateway.received) == 1


async def test_strict_v1_clients_revalidate_only_with_the_v1_tag() -> None:
    """Strict v1 answers are another representation (``"<tag>.vv1"``): the v1beta tag names
    the head's, so a ``/v1`` client sending it gets the v1 answer, not a 304."""
    path = "models/gemini-2.5-flash:countTokens"
    async for gateway in _gateway({"GEMINI_SCALE_STRICT_V1": "1", "GEMINI_SCALE_CACHE_TTL": "60"}):
        client = gateway.client
        beta_tag = (await client.post(f"/v1beta/{path}", json=GENERATE)).headers["etag"]
        v1 = await client.post(f"/v1/{path}", json=GENERATE, headers={"if-none-match": beta_tag})
        assert v1.status_code == 200
        assert v1.json()["totalTokens"] > 0
        assert v1.headers["etag"] == beta_tag[:-1] + '.vv1"'
        for validator in (v1.headers["etag"], f'{beta_tag}, {v1.headers["etag"]}', "*"):
            again = await client.post(
                f"/v1/{path}", json=GENERATE, headers={"if-none-match": validator}
            )
            assert again.status_code == 304, validator
            assert again.headers["etag"] == v1.headers["etag"]
        assert len(gateway.received) == 1


async def test_unknown_and_conflicting_versions(gateway: Gateway) -> None:
    """D13: an unknown version is 404, an empty segment 404; on a path-versioned route the
    path decides and ``X-API-Version`` is not consulted (the documented precedence)."""
    unknown = await gateway.client.get("/v9/models")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["status"] == "NOT_FOUND"
    assert "v1beta, v1" in unknown.json()["error"]["message"]
    alpha = await gateway.client.get("/v1alpha/models")
    assert alpha.status_code == 404
    conflicting = await gateway.client.get("/v1beta/models", headers={"X-API-Version": "v1"})
    assert conflicting.status_code == 200
    empty = await gateway.client.get("//models")
    assert empty.status_code == 404
    assert gateway.paths() == ["/v1beta/models"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../v1beta/models/gemini-2.5-flash:generateContent",
        "/v1/./models/gemini-2.5-flash:generateContent",
        "/v1beta//models/gemini-2.5-flash:generateContent",
        "/v1beta/models/..;x=y/gemini-2.5-flash:generateContent",
        "/v1beta/models/../models/gemini-2.5-flash:generateContent",
        "/v1/models/gemini-2.5-flash:generateContent/..",
    ],
)
async def test_paths_with_dot_segments_are_refused_before_any_layer(
    gateway: Gateway, path: str
) -> None:
    """D14: the server hands these over undecoded of dots; the version layer refuses them
    (no layer decides on a path that a client and the router read differently)."""
    token = gateway.client.headers["authorization"]
    recorded = await call(
        gateway.app, "POST", path, headers={"authorization": token}, json_body=GENERATE
    )
    assert recorded.status in (400, 404)
    assert json.loads(recorded.body)["error"]["code"] == recorded.status
    assert gateway.received == []


async def test_health_and_metrics_ignore_versions(gateway: Gateway) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await gateway.client.get(path, headers={"X-API-Version": "2001-01-01"})
        assert response.status_code == 200, path
        assert "deprecation" not in response.headers


@pytest.mark.parametrize("prefix", ["/v1", "/v1beta"])
async def test_a_body_within_the_cap_is_not_refused_for_its_migration(prefix: str) -> None:
    """Mapping a retired model re-encodes the body, and ``1e15`` is written out in full:
    the size cap applies to what the client sent."""
    raw = (b'{"generateContentRequest": {"model": "models/gemini-1.5-flash", "contents": '
           b'[{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"topP": 1e15}}}')
    async for gateway in _gateway({"GEMINI_SCALE_MAX_BODY_BYTES": str(len(raw))}):
        sent = await gateway.client.post(
            f"{prefix}/models/gemini-1.5-flash:countTokens", content=raw,
            headers={"content-type": "application/json"},
        )
        assert sent.status_code == 200, sent.text
        forwarded = gateway.received[-1].body
        assert len(forwarded) > len(raw)  # migrated, and longer
        assert b'"models/gemini-2.5-flash"' in forwarded
        over = await gateway.client.post(
            f"{prefix}/models/gemini-1.5-flash:countTokens", content=raw + b" ",
            headers={"content-type": "application/json"},
        )
        assert over.status_code == 413  # the client's own size still counts


async def test_a_lone_surrogate_does_not_inflate_a_migrated_body_past_the_cap() -> None:
    """A lone surrogate cannot be UTF-8: it alone is escaped, the rest of the text stays
    UTF-8 (escaping all of it would grow non-ASCII text up to threefold, past the cap)."""
    text = "\u00e9t\u00e9 \u65e5\u672c " * 300
    raw = (b'{"generate_content_request": {"model": "models/gemini-2.5-flash", "contents": '
           b'[{"role": "user", "parts": [{"text": "\\ud800 ' + text.encode() + b'"}]}]}}')
    async for gateway in _gateway({"GEMINI_SCALE_MAX_BODY_BYTES": str(len(raw))}):
        sent = await gateway.client.post(
            "/v1/models/gemini-2.5-flash:countTokens", content=raw,
            headers={"content-type": "application/json"},
        )
        # Sent on (the stand-in, like Gemini, then refuses the surrogate itself), not 413.
        assert sent.status_code == 400, sent.text
        assert "\\uXXXX" in sent.json()["error"]["message"]
        forwarded = gateway.received[-1].body
        assert b'"generateContentRequest"' in forwarded  # migrated
        assert b"\\ud800" in forwarded
        assert text.encode() in forwarded
        assert len(forwarded) <= len(raw)


async def test_a_migration_cannot_inflate_a_body_far_past_the_cap() -> None:
    """A body of nothing but ``1e15``s would grow fourfold when re-encoded: refused."""
    numbers = b",".join([b"1e15"] * 2000)
    raw = (b'{"generateContentRequest": {"model": "models/gemini-1.5-flash", "contents": '
           b'[{"role": "user", "parts": [{"text": "hi"}]}]}, "pad": [' + numbers + b"]}")
    async for gateway in _gateway({"GEMINI_SCALE_MAX_BODY_BYTES": str(len(raw))}):
        sent = await gateway.client.post(
            "/v1/models/gemini-1.5-flash:countTokens", content=raw,
            headers={"content-type": "application/json"},
        )
        assert sent.status_code == 413
        assert gateway.received == []



@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/models/gemini-2.5-flash:fooBar"), ("GET", "/v1/nothing"),
     ("GET", "/v1beta/nothing")],
)
async def test_not_found_names_the_path_the_client_sent(
    gateway: Gateway, method: str, path: str
) -> None:
    answer = await gateway.client.request(
        method, path, content=b"{}" if method == "POST" else None,
        headers={"content-type": "application/json"} if method == "POST" else {},
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == f"Method not found: {method} {path}."
