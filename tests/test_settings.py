"""Configuration: every variable validated, errors name the variable and hide the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gemini_scale import ConfigurationError, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEV = {"GEMINI_SCALE_DEV_ISSUER": "1"}


def test_defaults_match_the_design() -> None:
    settings = load_settings(DEV)
    assert settings.rate_limit == "60/minute"
    assert settings.token_limit == "1000000/minute"
    assert settings.ip_rate_limit == "600/minute"
    assert settings.on_store_error == "local"
    assert settings.cache_ttl == 300
    assert settings.cache_generation == "deterministic"
    assert settings.redis_url is None
    assert settings.uses_standin
    assert settings.effective_upstream_url is None


def test_key_pool_and_upstream_choice() -> None:
    settings = load_settings({**DEV, "GEMINI_API_KEY": "k1, k2,,k3"})
    assert settings.api_keys == ("k1", "k2", "k3")
    assert settings.effective_upstream_url == "https://generativelanguage.googleapis.com"
    custom = load_settings({**DEV, "GEMINI_SCALE_UPSTREAM_URL": "http://127.0.0.1:9/"})
    assert custom.effective_upstream_url == "http://127.0.0.1:9"
    assert not custom.uses_standin


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GEMINI_SCALE_CACHE_TTL", "soon"),
        ("GEMINI_SCALE_CACHE_TTL", "-1"),
        ("GEMINI_SCALE_RATE_LIMIT", "lots"),
        ("GEMINI_SCALE_TOKEN_LIMIT", "10/fortnight"),
        ("GEMINI_SCALE_IP_RATE_LIMIT", "x"),
        ("GEMINI_SCALE_ON_STORE_ERROR", "maybe"),
        ("GEMINI_SCALE_CACHE_GENERATION", "sometimes"),
        ("GEMINI_SCALE_TRUSTED_PROXIES", "10.0.0.0/8,not-a-net"),
        ("GEMINI_SCALE_UPSTREAM_URL", "ftp://example"),
        ("GEMINI_SCALE_OAUTH_ISSUER", "issuer-without-scheme"),
        ("GEMINI_SCALE_DEV_ISSUER", "perhaps"),
        ("GEMINI_SCALE_MAX_BODY_BYTES", "0"),
        ("GEMINI_SCALE_REDIS_URL", "memcached://127.0.0.1:11211"),
        # Values that used to start and fail later, or quietly mean something else:
        ("GEMINI_SCALE_IP_RATE_LIMIT", ""),  # was a 500 on every request
        ("GEMINI_API_KEY", " , "),  # set but blank: was the offline stand-in, silently
        ("GEMINI_SCALE_CACHE_TTL", "inf"),
        ("GEMINI_SCALE_UPSTREAM_TIMEOUT", "inf"),  # no timeout at all
        ("GEMINI_SCALE_ANOMALY_FACTOR", "inf"),  # a detector that never flags
        ("GEMINI_SCALE_RATE_LIMIT", "60/0 minute"),  # was read as 60 per minute
        # URLs that passed here and failed start-up with a traceback:
        ("GEMINI_SCALE_UPSTREAM_URL", "http://"),
        ("GEMINI_SCALE_UPSTREAM_URL", "http://user:pw@/v1"),
        ("GEMINI_SCALE_UPSTREAM_URL", "https://gemini.example/?x=1"),
        ("GEMINI_SCALE_UPSTREAM_URL", "https://gemini.example/v1#top"),
        ("GEMINI_SCALE_UPSTREAM_URL", "https://gemini.example:port/"),
        ("GEMINI_SCALE_OAUTH_JWKS_URL", "https:///keys"),
        ("GEMINI_SCALE_OAUTH_ISSUER", " https://issuer.example"),  # never an exact match
        ("GEMINI_SCALE_UPSTREAM_URL", "https://x.example/v1\n"),  # a secret file's newline
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**DEV, variable: value})
    assert variable in str(caught.value)


def test_secrets_are_never_echoed() -> None:
    secret = "redis://:s3cr3t-password@127.0.0.1:6379/0"
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**DEV, "GEMINI_SCALE_REDIS_URL": secret, "GEMINI_SCALE_CACHE_TTL": "x"})
    assert "s3cr3t" not in str(caught.value)


def test_a_trusted_proxy_entry_is_named_by_its_position() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**DEV, "GEMINI_SCALE_TRUSTED_PROXIES": "10.0.0.0/8,0.0.0.0/0"})
    assert "#2" in str(caught.value)
    assert "0.0.0.0" not in str(caught.value)


def test_a_url_password_is_never_echoed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**DEV, "GEMINI_SCALE_UPSTREAM_URL": "http://user:s3cr3t@/v1"})
    assert "s3cr3t" not in str(caught.value)


def test_a_mapping_is_read_as_the_environment_is() -> None:
    """The two variables that are not ours are read by their own names only, from a
    mapping as from the process environment."""
    settings = load_settings({
        **DEV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "GEMINI_SCALE_GEMINI_API_KEY": "not-the-key-variable",
        "GEMINI_SCALE_OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
    })
    assert settings.otel_exporter_otlp_endpoint == "http://127.0.0.1:4318"
    assert settings.api_keys == ()
    assert settings.uses_standin
    environment = subprocess.run(
        [sys.executable, "-c", "from gemini_scale import load_settings; s = load_settings(); "
         "print(s.otel_exporter_otlp_endpoint, s.api_keys)"],
        env={"PATH": "", "GEMINI_SCALE_DEV_ISSUER": "1",
             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
             "GEMINI_SCALE_GEMINI_API_KEY": "not-the-key-variable"},
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )
    assert environment.stdout.split() == ["http://127.0.0.1:4318", "()"]


def test_an_issuer_or_the_dev_issuer_is_required() -> None:
    with pytest.raises(ConfigurationError, match="GEMINI_SCALE_OAUTH_ISSUER"):
        load_settings({})
    with pytest.raises(ConfigurationError, match="GEMINI_SCALE_OAUTH_AUDIENCE"):
        load_settings({"GEMINI_SCALE_OAUTH_ISSUER": "https://idp.example"})
    settings = load_settings(
        {"GEMINI_SCALE_OAUTH_ISSUER": "https://idp.example", "GEMINI_SCALE_OAUTH_AUDIENCE": "gw"}
    )
    assert settings.oauth_issuer == "https://idp.example"


def test_the_gateway_refuses_to_start_and_names_the_variable() -> None:
    env = {"GEMINI_SCALE_DEV_ISSUER": "1", "GEMINI_SCALE_CACHE_TTL": "forever", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", "import example_app.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "GEMINI_SCALE_CACHE_TTL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_store_url_fails_start_up_naming_the_variable() -> None:
    from tests.gateway import build

    with pytest.raises(ConfigurationError) as caught:
        build({"GEMINI_SCALE_REDIS_URL": "redis+sentinel://:pw-secret@127.0.0.1:26379"})
    assert "GEMINI_SCALE_REDIS_URL" in str(caught.value)
    assert "pw-secret" not in str(caught.value)


def test_an_issuer_is_kept_exactly_as_given() -> None:
    """RFC 9068 §4 compares issuers exactly; Auth0's end in "/"."""
    settings = load_settings(
        {
            "GEMINI_SCALE_OAUTH_ISSUER": "https://tenant.auth0.com/",
            "GEMINI_SCALE_OAUTH_AUDIENCE": "gw",
            "GEMINI_SCALE_OAUTH_JWKS_URL": "https://tenant.auth0.com/.well-known/jwks.json/",
        }
    )
    assert settings.oauth_issuer == "https://tenant.auth0.com/"
    assert settings.oauth_jwks_url == "https://tenant.auth0.com/.well-known/jwks.json/"


def test_no_limits_at_all_names_both_variables() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**DEV, "GEMINI_SCALE_RATE_LIMIT": "", "GEMINI_SCALE_TOKEN_LIMIT": ""})
    assert "GEMINI_SCALE_RATE_LIMIT" in str(caught.value)
    assert "GEMINI_SCALE_TOKEN_LIMIT" in str(caught.value)


def test_a_blank_audience_is_no_audience() -> None:
    issuer = {"GEMINI_SCALE_OAUTH_ISSUER": "https://idp.example"}
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**issuer, "GEMINI_SCALE_OAUTH_AUDIENCE": " "})
    assert "GEMINI_SCALE_OAUTH_AUDIENCE" in str(caught.value)
