"""Gemini's own versions: ``/v1`` and ``/v1beta`` served by one head, and the shims that
old clients need (research/gemini-api.md §5).

* :class:`ProtoJSONSpelling`: both spellings of a member (``generation_config`` /
  ``generationConfig``) are accepted and passed on as camelCase; ``20.0`` in an integer
  field is passed on as ``20``. User-named members (JSON Schema ``properties``, function
  ``args``) keep their spelling.
* :class:`LegacyAltParameter`: the retired ``google-generativeai`` SDK adds
  ``$alt=json;enum-encoding=int`` to every call; it is removed (string enums are answered,
  which that SDK parses).
* :class:`ModelAliases`: retired model names are served by their successors, with
  ``Deprecation``, ``Sunset`` and ``Link: rel="successor-version"`` headers.
* :class:`StrictV1`: optionally, ``/v1`` refuses the members its published proto lacks
  with Google's exact 400 ``Unknown name`` answer, and omits v1beta-only answer members.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from gemini_scale.errors import ConfigurationError, InvalidArgumentError, bad_request_detail
from gemini_scale.gemini_json import AmbiguousSpellingError, camel_name, may_respell, normalize
from gemini_scale.policies import utc_datetime
from gemini_scale.versioning.bundle import Version, VersionBundle
from gemini_scale.versioning.changes import (
    RequestInfo,
    ResponseInfo,
    VersionChange,
    model_in_path,
    rename_model_members,
)
from gemini_scale.versioning.lifecycle import deprecation_headers

__all__ = [
    "GEMINI_MODEL_METHODS",
    "RETIRED_MODELS",
    "LegacyAltParameter",
    "ModelAlias",
    "ModelAliases",
    "ProtoJSONSpelling",
    "StrictV1",
    "gemini_versions",
]

#: The POST methods on ``models/{model}`` that take a JSON request body.
GEMINI_MODEL_METHODS: Final = (
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
)
_BODY_ROUTES: Final = tuple(f"POST /models/{{model}}:{m}" for m in GEMINI_MODEL_METHODS)
class ProtoJSONSpelling(VersionChange):
    """Request members may be spelled camelCase or snake_case, and integers as floats
    (``20.0``); the head gets camelCase and integers. User-named members keep their
    spelling."""

    description = (
        "Members may be spelled camelCase or snake_case (`generation_config`), and integers "
        "as floats (`20.0`); requests reach the head in camelCase, with integers. User-named "
        "members (JSON Schema `properties`, function `args`) keep their spelling."
    )
    reports_changes = True

    def __init__(self, routes: Sequence[str] | None = _BODY_ROUTES) -> None:
        super().__init__(routes=routes)

    def needs_body(self, raw: bytes) -> bool:
        return may_respell(raw)

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        try:
            value, changed = normalize(body)
        except AmbiguousSpellingError as exc:
            raise InvalidArgumentError(exc.message) from None
        if changed:
            request.body_changed = True
        return value


class LegacyAltParameter(VersionChange):
    """``$alt=json;enum-encoding=int`` (sent by the retired google-generativeai SDK on every
    call) is removed; answers keep string enums, which that SDK reads."""

    description = (
        "`$alt=json;enum-encoding=int` (sent by the retired google-generativeai SDK) is "
        "removed; answers keep string enums, which that SDK reads."
    )
    query_names = frozenset({"$alt"})

    def upgrade_request(self, request: RequestInfo) -> None:
        if any(name == "$alt" for name, _ in request.query):
            request.query[:] = [(n, v) for n, v in request.query if n != "$alt"]


@dataclass(frozen=True, slots=True)
class ModelAlias:
    """A retired model name served by ``successor``: ``deprecated`` is sent as RFC 9745
    ``Deprecation``, ``sunset`` (when known) as RFC 8594 ``Sunset``."""

    name: str
    successor: str
    deprecated: dt.datetime | dt.date
    sunset: dt.datetime | dt.date | None = None

    def __post_init__(self) -> None:
        for model in (self.name, self.successor):
            if not model or "/" in model or ":" in model:
                raise ConfigurationError(f"model alias: {model!r} must be a bare model id")
        if self.name == self.successor:
            raise ConfigurationError(f"model alias {self.name!r} names itself")


#: Retired Gemini model names and the successors the example gateway maps them to. Dates
#: are Google's announced shutdowns as we understand them (research/gemini-api.md §5.2;
#: check https://ai.google.dev/gemini-api/docs/deprecations before relying on them).
RETIRED_MODELS: Final = (
    ModelAlias("gemini-pro", "gemini-2.5-pro", dt.date(2024, 7, 12), dt.date(2025, 2, 15)),
    ModelAlias("gemini-1.0-pro", "gemini-2.5-pro", dt.date(2024, 7, 12), dt.date(2025, 2, 15)),
    ModelAlias("gemini-1.5-pro", "gemini-2.5-pro", dt.date(2025, 4, 29), dt.date(2025, 9, 24)),
    ModelAlias(
        "gemini-1.5-flash", "gemini-2.5-flash", dt.date(2025, 4, 29), dt.date(2025, 9, 24)
    ),
    ModelAlias(
        "gemini-1.5-flash-8b", "gemini-2.5-flash-lite", dt.date(2025, 4, 29),
        dt.date(2025, 9, 24),
    ),
)


class ModelAliases(VersionChange):
    """Retired model names are served by their successors; the answer says so with
    ``Deprecation``, ``Sunset`` and ``Link: <...>; rel="successor-version"``."""

    def __init__(self, aliases: Iterable[ModelAlias], *, prefix: str = "") -> None:
        self.aliases = {alias.name: alias for alias in aliases}
        self.successors = {name: a.successor for name, a in self.aliases.items()}
        self._encoded = tuple(f'{name}"'.encode() for name in self.aliases)
        self.prefix = prefix
        names = ", ".join(f"`{a.name}` → `{a.successor}`" for a in self.aliases.values())
        super().__init__(description=f"Retired models are served by successors: {names}.")

    def upgrade_path(self, method: str, path: str) -> str:
        found = model_in_path(path)
        if found is None or found[0] not in self.successors:
            return path
        return f"/models/{self.successors[found[0]]}{found[1]}"

    def response_headers(self, method: str, path: str) -> Sequence[tuple[str, str]]:
        found = model_in_path(path)
        alias = self.aliases.get(found[0]) if found is not None else None
        if alias is None:
            return ()
        successor = quote(f"{self.prefix}/models/{alias.successor}", safe="/:-._~")
        return deprecation_headers(
            utc_datetime(alias.deprecated, "deprecated"),
            utc_datetime(alias.sunset, "sunset"),
            None,
            successor,
        )

    reports_changes = True
    links_in_every_version = True  # every version serves the successor model

    def needs_body(self, raw: bytes) -> bool:
        return any(name in raw for name in self._encoded)

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        if rename_model_members(body, self.successors):
            request.body_changed = True
        return body


#: Members of the v1beta surface that the published v1 proto lacks (research §5.1), by the
#: message they belong to.
_V1BETA_ONLY_REQUEST: Final = frozenset(
    {"systemInstruction", "tools", "toolConfig", "cachedContent"}
)
_V1BETA_ONLY_CONFIG: Final = frozenset(
    {
        "responseMimeType", "responseSchema", "_responseJsonSchema",
        "responseModalities", "speechConfig", "thinkingConfig", "imageConfig",
        "mediaResolution",
    }
)
_V1BETA_ONLY_PART: Final = frozenset(
    {
        "functionCall", "functionResponse", "fileData", "executableCode",
        "codeExecutionResult", "thought", "thoughtSignature", "partMetadata",
    }
)


def _spelled(obj: dict[str, Any], names: frozenset[str]) -> list[str]:
    """The members of ``obj`` in ``names``, as the client spelled them (either way)."""
    return [key for key in obj if camel_name(key) in names]


class StrictV1(VersionChange):
    """``/v1`` behaves as its published proto: members only v1beta has are refused with
    Google's 400 ``Unknown name "…": Cannot find field.``, and ``cachedContentTokenCount``
    is left out of answers."""

    description = (
        "`/v1` is held to its published proto: members only v1beta has are refused with "
        'Google\'s 400 `Unknown name "…": Cannot find field.`, and `cachedContentTokenCount` '
        "is left out of answers."
    )
    reports_changes = True

    def __init__(self) -> None:
        super().__init__(routes=_BODY_ROUTES[:3])

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        violations: list[tuple[str, str]] = []
        self._request(body, "", violations)
        inner = body.get("generateContentRequest", body.get("generate_content_request"))
        if type(inner) is dict:
            self._request(inner, "generate_content_request", violations)
        if violations:
            message = "\n".join(description for _, description in violations)
            raise InvalidArgumentError(message, details=[bad_request_detail(violations)])
        return body

    @staticmethod
    def _violation(name: str, at: str) -> tuple[str, str]:
        where = f" at '{at}'" if at else ""
        return at, (
            f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.'
        )

    def _request(self, body: dict[str, Any], at: str, out: list[tuple[str, str]]) -> None:
        out.extend(self._violation(n, at) for n in _spelled(body, _V1BETA_ONLY_REQUEST))
        for key in ("generationConfig", "generation_config"):
            config = body.get(key)
            if type(config) is dict:
                where = f"{at}.generation_config" if at else "generation_config"
                out.extend(self._violation(n, where) for n in _spelled(config, _V1BETA_ONLY_CONFIG))
        contents = body.get("contents")
        if type(contents) is not list:
            return
        for i, content in enumerate(contents[:1000]):
            parts = content.get("parts") if type(content) is dict else None
            if type(parts) is not list:
                continue
            for j, part in enumerate(parts[:1000]):
                if type(part) is dict:
                    where = f"{at + '.' if at else ''}contents[{i}].parts[{j}]"
                    out.extend(self._violation(n, where) for n in _spelled(part, _V1BETA_ONLY_PART))

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        # A streamed array with a Content-Length (a cached replay) comes whole, as a list.
        for answer in body if type(body) is list else (body,):
            if type(answer) is dict:
                answer.pop("cachedContentTokenCount", None)
                usage = answer.get("usageMetadata")
                if type(usage) is dict:
                    usage.pop("cachedContentTokenCount", None)
        return body


def gemini_versions(
    *,
    aliases: Iterable[ModelAlias] = (),
    strict_v1: bool = False,
    head: str = "v1beta",
) -> VersionBundle:
    """Gemini's path versions, served by one head (``/v1beta`` by default, the superset):
    ``/v1`` requests are rewritten to the head and their answers come back unchanged
    (or, with ``strict_v1``, held to the published v1 proto). Every version accepts both
    spellings of a member, drops ``$alt`` and maps retired model ``aliases``."""
    if head not in ("v1beta", "v1alpha"):
        raise ConfigurationError(f"the Gemini head must be v1beta or v1alpha, not {head!r}")
    versions = [Version(head)]
    if head == "v1alpha":
        versions.append(Version("v1beta"))
    versions.append(Version("v1"))
    shims: list[VersionChange] = []
    if strict_v1:
        strict = StrictV1()
        strict.versions = frozenset({"v1"})
        shims.append(strict)
    # The head's own clients' bodies pass untouched (a head-version request costs only its
    # path); GeminiUpstream.forward sends every body on in camelCase.
    spelling = ProtoJSONSpelling()
    spelling.versions = frozenset(v.name for v in versions[1:])
    shims += [spelling, LegacyAltParameter()]
    aliases = tuple(aliases)
    if aliases:
        shims.append(ModelAliases(aliases, prefix=f"/{head}"))
    return VersionBundle(*versions, shims=shims)
