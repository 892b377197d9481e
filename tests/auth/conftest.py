"""Fixtures of the key-set tests (``test_jwks``, ``test_key_withdrawal``): a fake IdP
(``httpx.MockTransport``, every request counted), a ``FakeClock`` and validators built on
them, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gemini_scale.auth.jwt import Issuer, JWTValidator
from tests.auth.fake_idp import FakeIdP, FakeNetwork
from tests.auth.tokens import AUDIENCE, ISSUER, FakeClock, rsa_signer

RS = rsa_signer("kid1")
FETCH_TIMEOUT = 0.2


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def idp() -> FakeIdP:
    return FakeIdP(signers=(RS,))


@pytest.fixture
def network(idp: FakeIdP) -> FakeNetwork:
    return FakeNetwork(idp)


@pytest.fixture
async def client(network: FakeNetwork) -> AsyncIterator[httpx.AsyncClient]:
    async with network.client() as client:
        yield client


Build = Callable[..., JWTValidator]


@pytest.fixture
async def build(client: httpx.AsyncClient, idp: FakeIdP,
                clock: FakeClock) -> AsyncIterator[Build]:
    made: list[JWTValidator] = []

    def make(*, validator: dict[str, Any] | None = None, **issuer: Any) -> JWTValidator:
        settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
        if not issuer.pop("discover", False):
            settings["jwks_url"] = idp.jwks_url
        settings.update(issuer)
        options = {"fetch_timeout": FETCH_TIMEOUT, **(validator or {})}
        made.append(JWTValidator([Issuer(**settings)], http_client=client, clock=clock, **options))
        return made[-1]

    yield make
    for validator in made:
        await validator.aclose()


@pytest.fixture
def validator(build: Build) -> JWTValidator:
    return build()
