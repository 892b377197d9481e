"""``OAuth2Middleware``: a verified principal for every request, or a refusal before the app."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gemini_scale.auth.base import TokenVerifier
from gemini_scale.auth.credentials import (
    MAX_FORM_BYTES,
    Credential,
    extract_credential,
    form_has_token,
    is_form,
)
from gemini_scale.auth.errors import (
    AuthError,
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
)
from gemini_scale.auth.user import PrincipalUser, auth_credentials
from gemini_scale.body import replay_receive
from gemini_scale.errors import ConfigurationError, canonical_status, send_error
from gemini_scale.policies import Policy, PublicPolicy, ScopePolicy
from gemini_scale.principal import Principal
from gemini_scale.routing import (
    AUTH_REFUSAL_KEY,
    GeminiMiddleware,
    PathSet,
    RequestContext,
    Rules,
    policy_for,
    route_path,
)
from gemini_scale.types import SYSTEM_CLOCK, ASGIApp, Clock, Receive, Scope, Send

if TYPE_CHECKING:
    import httpx

    from gemini_scale.auth.api_keys import APIKeys
    from gemini_scale.auth.jwt import Issuer

logger = logging.getLogger("gemini_scale.auth")

# RFC 6750 §3: realm and descriptions are quoted-strings we never build from input.
_SAFE_PARAM = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]*")

DEFAULT_PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics")


class OAuth2Middleware(GeminiMiddleware):
    """Validate the caller's credential and set ``request.user``, ``request.auth`` and
    ``request.state.principal``; refuse with RFC 6750 challenges in Google's envelope.

    Credentials: JWT access tokens (RFC 9068) from the configured issuers (``issuer`` +
    ``audience`` [+ ``jwks_url``], or ``issuers=[Issuer(...), ...]``, or a ready ``jwt``
    verifier), opaque tokens by ``introspection`` (RFC 7662), and service-account
    ``api_keys`` sent as ``x-goog-api-key``. Any of them can be left out; at least one is
    needed. Routes marked :func:`~gemini_scale.public` or under ``public_paths`` (exact
    paths, or prefixes ending in ``/``) need no credential; routes marked
    :func:`~gemini_scale.requires_scopes` need those scopes (403 ``insufficient_scope``).
    Every other route needs a valid credential.

    Options:
        realm: the fixed ``realm`` of challenges (never built from the request).
        rules: central rules (path template -> ``ScopePolicy`` / ``PublicPolicy``).
        cors_preflight: let CORS preflights (``OPTIONS`` with ``Origin`` and
            ``Access-Control-Request-Method``) through without a credential.
        max_token_bytes: longer credentials are refused before any decoding.
        http_client: shared client for JWKS, discovery and introspection (else one is
            created on first use and closed at shutdown).
        clock: time source (tests).
    """

    span_name = "gemini_scale.auth"

    enforces = frozenset({ScopePolicy, PublicPolicy})

    def __init__(
        self,
        app: ASGIApp,
        *,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        jwks_url: str | None = None,
        issuers: Sequence[Issuer] = (),
        jwt: TokenVerifier | None = None,
        introspection: TokenVerifier | None = None,
        api_keys: APIKeys | None = None,
        realm: str = "gemini-scale",
        public_paths: Sequence[str] = DEFAULT_PUBLIC_PATHS,
        rules: Mapping[str, Policy | Sequence[Policy]] | None = None,
        cors_preflight: bool = False,
        max_token_bytes: int = 8192,
        http_client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(app)
        if not _SAFE_PARAM.fullmatch(realm) or not realm:
            raise ConfigurationError("realm must be printable ASCII without quotes or backslashes")
        if jwt is not None and (issuer or audience or jwks_url or issuers):
            raise ConfigurationError("give either jwt=... or issuer/issuers, not both")
        self._jwt = jwt or _jwt_validator(
            issuer=issuer,
            audience=audience,
            jwks_url=jwks_url,
            issuers=issuers,
            http_client=http_client,
            clock=clock,
            max_token_bytes=max_token_bytes,
        )
        self._introspection = introspection
        self._api_keys = api_keys
        if self._jwt is None and introspection is None and api_keys is None:
            raise ConfigurationError(
                "OAuth2Middleware needs an issuer (issuer+audience or issuers=), a jwt or "
                "introspection verifier, or api_keys"
            )
        self.realm = realm
        self._public = PathSet(public_paths)
        self._rules = Rules(rules)
        self.cors_preflight = cors_preflight
        self.max_token_bytes = max_token_bytes

    async def aclose(self) -> None:
        """Close the verifiers' own HTTP clients."""
        for verifier in (self._jwt, self._introspection):
            if verifier is not None:
                await verifier.aclose()

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        if self._is_public(scope, context) or self._is_preflight(scope):
            await self.app(scope, receive, send)
            return
        try:
            credential = extract_credential(
                scope, api_keys=self._api_keys is not None, max_token_bytes=self.max_token_bytes
            )
            # The token first: a request whose token fails costs no body read.
            principal = await self._verify(credential)
            if credential.kind == "bearer" and is_form(scope):
                receive = await self._refuse_second_form_token(receive)
            required = policy_for(context, self._rules, ScopePolicy, scope)
            if required is not None and not principal.scopes.issuperset(required.scopes):
                raise InsufficientScopeError(required.scopes)
        except AuthError as refused:
            context.extras[AUTH_REFUSAL_KEY] = refused.reason
            logger.info(
                "refused %s %s: %s",
                scope["method"],
                context.route.template if context.route else "(unmatched)",
                type(refused).__name__,
            )
            await self._send_refusal(send, refused)
            return
        scope["user"] = PrincipalUser(principal)
        scope["auth"] = auth_credentials(principal)
        state = scope.setdefault("state", {})
        state["principal"] = principal
        context.principal = principal
        await self.app(scope, receive, send)

    def _is_public(self, scope: Scope, context: RequestContext) -> bool:
        if route_path(scope) in self._public:
            return True
        return policy_for(context, self._rules, PublicPolicy, scope) is not None

    def _is_preflight(self, scope: Scope) -> bool:
        if not self.cors_preflight or scope["method"] != "OPTIONS":
            return False
        names = {key.lower() for key, _ in scope["headers"]}
        return b"origin" in names and b"access-control-request-method" in names

    async def _verify(self, credential: Credential) -> Principal:
        if credential.kind == "api_key":
            assert self._api_keys is not None
            principal = self._api_keys.lookup(credential.value)
            if principal is None:
                raise InvalidTokenError("The API key is invalid.")
            return principal
        token = credential.value
        if self._jwt is not None and token.count(".") == 2:
            return await self._jwt.verify(token)
        if self._introspection is not None:
            return await self._introspection.verify(token)
        raise InvalidTokenError("The access token is malformed.")

    async def _refuse_second_form_token(self, receive: Receive) -> Receive:
        """RFC 6750 §2: a form body with ``access_token`` next to the header is refused."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise InvalidRequestError("The client disconnected while sending the body.")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                raise InvalidRequestError("The form body is too large.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if form_has_token(body):
            raise InvalidRequestError("The access token was sent by more than one method.")
        return replay_receive(body, receive)

    async def _send_refusal(self, send: Send, refused: AuthError) -> None:
        headers: dict[str, str] = {}
        if refused.status_code == 503:
            headers["retry-after"] = str(getattr(refused, "retry_after", 5))
        else:
            headers["www-authenticate"] = self._challenge(refused)
        await send_error(
            send,
            refused.status_code,
            refused.description,
            status=canonical_status(refused.status_code),
            headers=headers,
        )

    def _challenge(self, refused: AuthError) -> str:
        parts = [f'Bearer realm="{self.realm}"']
        if refused.error is not None:
            parts.append(f'error="{refused.error}"')
            description = refused.description
            if _SAFE_PARAM.fullmatch(description):
                parts.append(f'error_description="{description}"')
        if isinstance(refused, InsufficientScopeError):
            parts.append(f'scope="{" ".join(sorted(refused.required))}"')
        return ", ".join(parts)


def _jwt_validator(
    *,
    issuer: str | None,
    audience: str | Sequence[str] | None,
    jwks_url: str | None,
    issuers: Sequence[Issuer],
    http_client: httpx.AsyncClient | None,
    clock: Clock,
    max_token_bytes: int,
) -> TokenVerifier | None:
    configured = list(issuers)
    if issuer is not None:
        if audience is None:
            raise ConfigurationError("OAuth2Middleware(issuer=...) needs audience=...")
        from gemini_scale.auth.jwt import Issuer

        configured.append(Issuer(issuer=issuer, audience=audience, jwks_url=jwks_url))
    elif audience is not None or jwks_url is not None:
        raise ConfigurationError("audience and jwks_url go with issuer=...")
    if not configured:
        return None
    from gemini_scale.auth.jwt import JWTValidator

    return JWTValidator(
        configured, http_client=http_client, clock=clock, max_token_bytes=max_token_bytes
    )


def principal_of(scope: Scope) -> Principal | None:
    """The verified principal of a request, if authentication ran and passed."""
    state: Any = scope.get("state")
    principal = state.get("principal") if isinstance(state, dict) else None
    return principal if isinstance(principal, Principal) else None
