"""APIKeys: digests only, lookups, and the environment syntax."""

from __future__ import annotations

import hashlib
import re

import pytest

from gemini_scale.auth.api_keys import APIKeyEntry, APIKeys
from gemini_scale.errors import ConfigurationError
from gemini_scale.principal import Principal

KEY = "gsk_live_4f9aQ2xV7mN1pL8cR3tB6yW0"
OTHER_KEY = "gsk_live_Zr5Hk9Jd2Qs7Vn4Xc1Mb8Lp6"
DIGEST_HEX = hashlib.sha256(KEY.encode()).hexdigest()
OTHER_HEX = hashlib.sha256(OTHER_KEY.encode()).hexdigest()
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def sha256(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def assert_nothing_secret(message: str) -> None:
    assert not HEX64.search(message)
    assert KEY not in message
    assert OTHER_KEY not in message


# --- hashing -------------------------------------------------------------------------------


def test_hash_key_is_prefixed_sha256() -> None:
    assert APIKeys.hash_key("test") == (
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )
    assert APIKeys.hash_key(KEY) == f"sha256:{DIGEST_HEX}"


@pytest.mark.parametrize(
    "key",
    ["", "with space", "tab\tkey", "nul\x00key", "ключ", "k" * 513],
    ids=["empty", "space", "tab", "nul", "non-ascii", "too-long"],
)
def test_hash_key_refuses_keys_lookup_could_never_accept(key: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        APIKeys.hash_key(key)
    if key:
        assert key not in str(caught.value)


# --- lookup --------------------------------------------------------------------------------


def test_lookup_hit_gives_the_principal() -> None:
    keys = APIKeys(
        {
            APIKeys.hash_key(KEY): APIKeyEntry(
                subject="batch-job", scopes=frozenset({"gemini.generate"}), tenant="acme"
            )
        }
    )
    assert keys.lookup(KEY) == Principal(
        issuer="urn:gemini-scale:api-key",
        subject="batch-job",
        client_id="batch-job",
        tenant="acme",
        scopes=frozenset({"gemini.generate"}),
    )
    assert APIKeys.ISSUER == "urn:gemini-scale:api-key"


def test_lookup_uses_the_entry_client_id_when_set() -> None:
    keys = APIKeys({DIGEST_HEX: APIKeyEntry(subject="svc", client_id="svc-client")})
    principal = keys.lookup(KEY)
    assert principal is not None
    assert (principal.client_id, principal.tenant, principal.scopes) == (
        "svc-client",
        None,
        frozenset(),
    )


def test_lookup_tells_keys_apart() -> None:
    keys = APIKeys(
        {
            f"sha256:{DIGEST_HEX}": APIKeyEntry(subject="one"),
            OTHER_HEX.upper(): APIKeyEntry(subject="two"),
        }
    )
    assert len(keys) == 2
    assert (one := keys.lookup(KEY)) is not None
    assert one.subject == "one"
    assert (two := keys.lookup(OTHER_KEY)) is not None
    assert two.subject == "two"


@pytest.mark.parametrize(
    "presented",
    [KEY + "x", KEY[:-1], KEY.upper(), "", f"sha256:{DIGEST_HEX}", DIGEST_HEX],
    ids=["suffix", "prefix", "case", "empty", "the-digest-itself", "bare-digest"],
)
def test_lookup_miss(presented: str) -> None:
    keys = APIKeys({APIKeys.hash_key(KEY): APIKeyEntry(subject="svc")})
    assert keys.lookup(presented) is None


@pytest.mark.parametrize(
    "key",
    ["k" * 513, "key with space", "key\x00nul", "key\x7f", "kéy", "key\n"],
    ids=["too-long", "space", "nul", "del", "latin1", "newline"],
)
def test_lookup_refuses_impossible_keys_even_if_their_digest_is_stored(key: str) -> None:
    keys = APIKeys({sha256(key): APIKeyEntry(subject="svc")})
    assert keys.lookup(key) is None


def test_longest_key_is_accepted() -> None:
    key = "k" * 512
    keys = APIKeys({APIKeys.hash_key(key): APIKeyEntry(subject="svc")})
    assert keys.lookup(key) is not None


def test_lookup_returns_an_equal_principal_every_time() -> None:
    keys = APIKeys({DIGEST_HEX: APIKeyEntry(subject="svc")})
    first = keys.lookup(KEY)
    assert first is not None
    assert first == keys.lookup(KEY)
    assert first.key == "urn:gemini-scale:api-key|svc"


# --- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        KEY,
        DIGEST_HEX[:-1],
        DIGEST_HEX + "0",
        "sha512:" + DIGEST_HEX,
        "sha256:" + "g" * 64,
        "SHA256:" + DIGEST_HEX,
        " " + DIGEST_HEX,
        "",
    ],
    ids=[
        "plaintext",
        "63-hex",
        "65-hex",
        "other-algorithm",
        "non-hex",
        "prefix-case",
        "leading-space",
        "empty",
    ],
)
def test_plaintext_and_malformed_digests_refused(stored: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        APIKeys({stored: APIKeyEntry(subject="svc")})
    message = str(caught.value)
    assert "#1" in message
    if stored:
        assert stored.strip() not in message
    assert_nothing_secret(message)


def test_same_digest_twice_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        APIKeys(
            {
                f"sha256:{DIGEST_HEX}": APIKeyEntry(subject="a"),
                DIGEST_HEX.upper(): APIKeyEntry(subject="b"),
            }
        )
    assert_nothing_secret(str(caught.value))


def test_empty_mapping_accepts_nothing() -> None:
    keys = APIKeys({})
    assert len(keys) == 0
    assert keys.lookup(KEY) is None


def test_repr_lists_no_digests() -> None:
    keys = APIKeys({DIGEST_HEX: APIKeyEntry(subject="svc")})
    assert repr(keys) == "APIKeys(<1 keys>)"


@pytest.mark.parametrize(
    "make",
    [
        lambda: APIKeyEntry(subject=""),
        lambda: APIKeyEntry(subject="svc", scopes={"a"}),  # type: ignore[arg-type]
        lambda: APIKeyEntry(subject="svc", scopes=frozenset({"a b"})),
        lambda: APIKeyEntry(subject="svc", scopes=frozenset({""})),
    ],
    ids=["empty-subject", "mutable-scopes", "scope-with-space", "empty-scope"],
)
def test_bad_entries_refused(make: object) -> None:
    with pytest.raises(ConfigurationError):
        make()  # type: ignore[operator]


# --- from_env ----------------------------------------------------------------------------


def test_from_env_documented_example() -> None:
    keys = APIKeys.from_env(
        f"sha256:{DIGEST_HEX}=batch-job:gemini.generate gemini.read;"
        f"sha256:{OTHER_HEX}=reporting:gemini.read:acme"
    )
    batch = keys.lookup(KEY)
    reporting = keys.lookup(OTHER_KEY)
    assert batch is not None
    assert reporting is not None
    assert (batch.subject, batch.client_id, batch.tenant, batch.scopes) == (
        "batch-job",
        "batch-job",
        None,
        frozenset({"gemini.generate", "gemini.read"}),
    )
    assert (reporting.subject, reporting.tenant, reporting.scopes) == (
        "reporting",
        "acme",
        frozenset({"gemini.read"}),
    )


@pytest.mark.parametrize(
    ("value", "subject", "scopes", "tenant"),
    [
        (f"{DIGEST_HEX}=svc", "svc", set(), None),
        (f"sha256:{DIGEST_HEX}=svc:", "svc", set(), None),
        (f"sha256:{DIGEST_HEX}=svc::acme", "svc", set(), "acme"),
        (f"sha256:{DIGEST_HEX.upper()}=svc@proj.example:a", "svc@proj.example", {"a"}, None),
        (f"\n  sha256:{DIGEST_HEX} = svc : a  b : acme ;\n;", "svc", {"a", "b"}, "acme"),
    ],
    ids=["bare-hex", "empty-scopes", "tenant-only", "uppercase-hex", "whitespace"],
)
def test_from_env_variants(value: str, subject: str, scopes: set[str], tenant: str | None) -> None:
    principal = APIKeys.from_env(value).lookup(KEY)
    assert principal is not None
    assert (principal.subject, principal.scopes, principal.tenant) == (
        subject,
        frozenset(scopes),
        tenant,
    )


def test_from_env_newline_separated() -> None:
    keys = APIKeys.from_env(f"sha256:{DIGEST_HEX}=one:a\nsha256:{OTHER_HEX}=two:b\n")
    assert len(keys) == 2


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(" ;\n ; ", id="only-separators"),
        pytest.param(f"sha256:{DIGEST_HEX}", id="no-equals"),
        pytest.param(f"{KEY}=svc:gemini.read", id="plaintext-key"),
        pytest.param(f"{DIGEST_HEX[:40]}=svc", id="short-digest"),
        pytest.param(f"sha256:{DIGEST_HEX}=", id="empty-subject"),
        pytest.param(f"sha256:{DIGEST_HEX}=:gemini.read", id="subject-missing"),
        pytest.param(f"sha256:{DIGEST_HEX}=two words:a", id="subject-with-space"),
        pytest.param(f"sha256:{DIGEST_HEX}=svc:a:acme:extra", id="too-many-fields"),
        pytest.param(f"sha256:{DIGEST_HEX}=svc:a:", id="empty-tenant"),
        pytest.param(f"sha256:{DIGEST_HEX}=svc:a:two words", id="tenant-with-space"),
        pytest.param(f"sha256:{DIGEST_HEX}=svc:a sha256:{OTHER_HEX}=svc2", id="missing-separator"),
        pytest.param(f"sha256:{DIGEST_HEX}=svc:a=b", id="equals-in-scope"),
        pytest.param(f"sha256:{DIGEST_HEX}=a;{DIGEST_HEX.upper()}=b", id="duplicate"),
    ],
)
def test_from_env_bad_syntax(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        APIKeys.from_env(value)
    assert_nothing_secret(str(caught.value))


def test_from_env_error_names_the_entry_position() -> None:
    with pytest.raises(ConfigurationError, match="entry #2"):
        APIKeys.from_env(f"sha256:{DIGEST_HEX}=ok;{KEY}=svc")
