"""Configuration from ``GEMINI_SCALE_*`` environment variables (pydantic-settings).

:func:`load_settings` turns any invalid value into a :class:`ConfigurationError` whose
message names the variable and never echoes its value (it may be a secret).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gemini_scale.errors import ConfigurationError
from gemini_scale.policies import parse_limits
from gemini_scale.urls import http_url_problem

ENV_PREFIX = "GEMINI_SCALE_"
GOOGLE_BASE_URL = "https://generativelanguage.googleapis.com"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


class GeminiScaleSettings(BaseSettings):
    """Every setting of a gemini-scale gateway, read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, case_sensitive=False
    )

    upstream_url: str | None = None
    """Gemini base URL; unset: the offline stand-in without a key, else Google's."""
    gemini_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY"), repr=False
    )
    """Upstream key(s), comma-separated for a pool."""
    redis_url: str | None = None
    """Shared store URL (``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``)."""
    oauth_issuer: str | None = None
    """Trusted issuer (discovery from it)."""
    oauth_audience: str | None = None
    """Required audience."""
    oauth_jwks_url: str | None = None
    """JWKS override."""
    client_api_keys: str = Field(default="", repr=False)
    """Service-account API keys accepted as ``x-goog-api-key``, as SHA-256 digests:
    ``sha256:<hex>=<subject>[:<scopes>[:<tenant>]]`` entries separated by ``;``."""
    dev_issuer: bool = False
    """Built-in demo issuer at ``POST /dev/token``."""
    rate_limit: str = "60/minute"
    """Per-principal request limits."""
    token_limit: str = "1000000/minute"  # noqa: S105 (a limit, not a secret)
    """Per-principal Gemini token limits."""
    ip_rate_limit: str = "600/minute"
    """Per-client-IP limit before authentication."""
    on_store_error: Literal["local", "open", "closed"] = "local"
    """What to do when the store fails."""
    cache_ttl: float = Field(default=300, ge=0, allow_inf_nan=False)
    """Cache entry lifetime in seconds; ``0`` disables caching."""
    cache_generation: Literal["off", "deterministic", "all"] = "deterministic"
    """Which ``generateContent`` answers may be cached."""
    trusted_proxies: str = ""
    """CIDRs whose ``X-Forwarded-For`` is believed (comma-separated)."""
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Largest accepted request body."""
    upstream_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds to wait for the upstream (per read)."""
    strict_v1: bool = False
    """``/v1`` refuses the members its published proto lacks, as Google's v1 once did."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of every log record, access records included (INFO)."""
    log_format: Literal["json", "text"] = "json"
    """One JSON object per record, or ``key=value`` text lines."""
    access_log: bool = True
    """One access record per request (logger ``gemini_scale.access``)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    """OpenTelemetry's own variable: set, traces are exported there (needs the ``otel``
    extra)."""
    anomaly_factor: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    """A principal's usage this many times its own baseline is flagged; ``0`` turns the
    detector off."""

    @field_validator("anomaly_factor")
    @classmethod
    def _factor(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("0 (off) or more than 1: usage this many times its baseline")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.lower() if value.lower() in ("json", "text") else value.upper()

    @field_validator("rate_limit", "token_limit", "ip_rate_limit")
    @classmethod
    def _valid_limits(cls, value: str, info: ValidationInfo) -> str:
        try:
            parsed = parse_limits(value)
        except ConfigurationError as exc:
            raise ValueError("not a rate limit such as '60/minute;1000/day'") from exc
        if not parsed and info.field_name == "ip_rate_limit":
            raise ValueError("empty: the per-address limit cannot be turned off here")
        return value

    @field_validator("gemini_api_key")
    @classmethod
    def _some_key(cls, value: str | None) -> str | None:
        # Set but blank (an empty secret mount): never the offline stand-in in its place.
        if value is not None and not _split(value):
            raise ValueError("set but holds no key (unset it for the offline stand-in)")
        return value

    @field_validator("oauth_audience")
    @classmethod
    def _audience(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("blank")
        return value

    @field_validator("client_api_keys")
    @classmethod
    def _valid_client_api_keys(cls, value: str) -> str:
        if value.strip():
            from gemini_scale.auth.api_keys import APIKeys

            try:
                APIKeys.from_env(value)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_cidrs(cls, value: str) -> str:
        for position, cidr in enumerate(_split(value), start=1):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"entry {position} is not an IP network (CIDR)") from exc
        from gemini_scale.keys import TrustedProxies

        try:
            TrustedProxies(_split(value))  # refuses "*" and networks covering every address
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _valid_store_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        schemes = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://")
        if not value.startswith(schemes):
            raise ValueError("must start with " + ", ".join(schemes))
        return value

    @field_validator("upstream_url", "oauth_issuer", "oauth_jwks_url")
    @classmethod
    def _valid_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            problem = http_url_problem(value, base=info.field_name == "upstream_url")
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("upstream_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        # Only the upstream base loses its trailing slash: an issuer is compared exactly
        # (RFC 9068 §4; Auth0's issuers end in "/"), and a JWKS URL is used as given.
        return value.rstrip("/") if value else value

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The upstream key pool."""
        return _split(self.gemini_api_key)

    @property
    def trusted_proxy_list(self) -> tuple[str, ...]:
        """:attr:`trusted_proxies` as a list of CIDR strings."""
        return _split(self.trusted_proxies)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Parsed :attr:`trusted_proxies`."""
        return tuple(ipaddress.ip_network(c, strict=False) for c in _split(self.trusted_proxies))

    @property
    def uses_standin(self) -> bool:
        """Whether the offline stand-in serves as upstream (no URL and no key)."""
        return self.upstream_url is None and not self.api_keys

    @property
    def effective_upstream_url(self) -> str | None:
        """The upstream base URL, or ``None`` for the in-process stand-in."""
        if self.upstream_url:
            return self.upstream_url
        return GOOGLE_BASE_URL if self.api_keys else None


#: Variables read without the ``GEMINI_SCALE_`` prefix (not ours), and only so.
_UNPREFIXED = frozenset({"GEMINI_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT"})


def _variable(field: str) -> str:
    if field.upper() in _UNPREFIXED:
        return field.upper()
    return ENV_PREFIX + field.upper()


def load_settings(environ: Mapping[str, str] | None = None) -> GeminiScaleSettings:
    """Read settings from ``environ`` (default: the process environment).

    Raises :class:`ConfigurationError` naming each invalid variable.
    """
    try:
        settings = GeminiScaleSettings() if environ is None else _from_mapping(environ)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{_variable(field)}: {error['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
    if not parse_limits(settings.rate_limit) and not parse_limits(settings.token_limit):
        raise ConfigurationError(
            "GEMINI_SCALE_RATE_LIMIT, GEMINI_SCALE_TOKEN_LIMIT: both empty (a principal "
            "needs request or token limits)"
        )
    if settings.oauth_issuer is not None and not settings.oauth_audience:
        raise ConfigurationError(
            "GEMINI_SCALE_OAUTH_AUDIENCE: required with GEMINI_SCALE_OAUTH_ISSUER "
            "(RFC 9068: tokens must be for this resource)"
        )
    if settings.oauth_issuer is None and not settings.dev_issuer:
        raise ConfigurationError(
            "GEMINI_SCALE_OAUTH_ISSUER: required (the trusted token issuer), unless "
            "GEMINI_SCALE_DEV_ISSUER=1 turns on the built-in demo issuer"
        )
    return settings


def _from_mapping(environ: Mapping[str, str]) -> GeminiScaleSettings:
    values: dict[str, str] = {}
    for name, value in environ.items():
        upper = name.upper()
        if upper in _UNPREFIXED:
            values[upper] = value
        elif upper.startswith(ENV_PREFIX) and upper[len(ENV_PREFIX) :] not in _UNPREFIXED:
            values[upper[len(ENV_PREFIX) :].lower()] = value
    # Validate the mapping alone: the process environment must not leak in.
    return GeminiScaleSettings.model_validate(values)
