"""A real OAuth 2.0 authorization server for end-to-end tests, built on authlib's Flask
integration and served by werkzeug on 127.0.0.1 in a background thread.

* Clients live in memory and authenticate with ``client_secret_basic`` (RFC 6749 §2.3.1).
* The only grant is client credentials (RFC 6749 §4.4).
* Access tokens are RFC 9068 ``at+jwt`` JWTs from authlib's ``JWTBearerTokenGenerator``,
  signed RS256 with a key generated when the server is built (never stored).
* ``aud`` is the configured ``audience``, or the ``resource`` parameter of the token request
  (RFC 8707) when it names one of the configured ``resources`` (else ``invalid_target``).
* ``/.well-known/oauth-authorization-server`` serves RFC 8414 metadata (checked with
  authlib's own validator); ``jwks_uri`` serves the public keys.
* The identity provider can be rotated (:meth:`AuthorizationServer.rotate`), stopped and
  started again on the same port (connections refused meanwhile), or made to answer an
  error status or a junk document on its key and metadata endpoints
  (:meth:`AuthorizationServer.outage`).
  Every hit is counted per endpoint on the server side.

The issuer is the server's own base URL, ``http://127.0.0.1:<port>``. Responses close their
connection (HTTP/1.0), so stopping the server really cuts clients off: no pooled keep-alive
connection keeps being served by a handler thread.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import flask
import httpx
from authlib.integrations.flask_oauth2 import AuthorizationServer as FlaskAuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = ["AuthorizationServer", "Client", "request_token", "unverified_segment"]

TOKEN_PATH = "/oauth2/token"
JWKS_PATH = "/oauth2/jwks"
METADATA_PATH = "/.well-known/oauth-authorization-server"
SCOPES = ("gemini.generate", "gemini.read", "gemini.admin")
OUTAGE_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>"


@dataclass(frozen=True)
class Client(ClientMixin):
    """An in-memory confidential client allowed the client-credentials grant only."""

    client_id: str
    client_secret: str = field(repr=False)
    scope: str = " ".join(SCOPES)
    """Scopes the client may be granted (space-delimited); also its default scope."""

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic" and endpoint == "token"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"

    def get_allowed_scope(self, scope: str | None) -> str:
        # RFC 6749 §3.3: an omitted scope gets the default; requested scopes the client may
        # not have are left out (the response's "scope" then tells the client).
        allowed = self.scope.split()
        if not scope:
            return " ".join(allowed)
        return " ".join(s for s in scope.split() if s in allowed)


class InvalidTargetError(OAuth2Error):
    """RFC 8707 §2: the requested resource is unknown or not allowed."""

    error = "invalid_target"
    status_code = 400


def _requested_resource() -> str | None:
    resources: list[str] = flask.request.form.getlist("resource")
    if len(resources) > 1:  # one audience per token keeps tokens single-purpose
        raise InvalidTargetError("Only one resource may be requested.")
    return resources[0] if resources else None


class _ClientCredentialsGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        resource = _requested_resource()
        if resource is not None and resource not in self.server.resources:
            raise InvalidTargetError("The requested resource is not known.")


class _TokenGenerator(JWTBearerTokenGenerator):
    """authlib's RFC 9068 generator with our signing key and audience."""

    def __init__(self, owner: AuthorizationServer) -> None:
        super().__init__(issuer=owner.issuer, alg="RS256", expires_generator=owner.token_lifetime)
        self._owner = owner

    def get_jwks(self) -> KeySet:
        # A key set (not a bare key) makes joserfc put the signing key's "kid" in the header.
        return KeySet([self._owner.signing_key])

    def get_audiences(self, client: Client, user: object, scope: str) -> str:
        return _requested_resource() or self._owner.audience


class _FlaskAuthorizationServer(FlaskAuthorizationServer):
    resources: frozenset[str] = frozenset()


class _QuietHandler(WSGIRequestHandler):
    # HTTP/1.0: every response closes its connection (see the module docstring).
    protocol_version = "HTTP/1.0"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log."""


class AuthorizationServer:
    """The authorization server; use as a context manager (starts, and stops in ``finally``).

    Args:
        audience: the default ``aud`` (resource indicator) of access tokens.
        resources: other resource indicators a token request may name (RFC 8707).
        clients: client id -> secret (all scopes) or :class:`Client`.
        token_lifetime: seconds an access token is valid (``None``: authlib's default for
            the grant, 864 000 s for client credentials).
        jwks_max_age: ``Cache-Control: max-age`` of the key set.
    """

    def __init__(
        self,
        *,
        audience: str,
        resources: tuple[str, ...] = (),
        clients: Mapping[str, str | Client] | None = None,
        token_lifetime: int | None = 300,
        jwks_max_age: int = 300,
    ) -> None:
        self.audience = audience
        self.token_lifetime = token_lifetime
        self.jwks_max_age = jwks_max_age
        self.clients: dict[str, Client] = {}
        for client_id, value in (clients or {"gateway-client": secrets.token_urlsafe(24)}).items():
            self.clients[client_id] = (
                value if isinstance(value, Client) else Client(client_id, value)
            )
        self.issued: list[dict[str, Any]] = []
        """Token responses, in order (the ``save_token`` hook)."""
        self._outage: tuple[int, str, str] | None = None
        self._published: list[RSAKey] = []
        self.signing_key = self._new_key()
        self._hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._port = 0
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._oauth = _FlaskAuthorizationServer(
            query_client=self.clients.get, save_token=self._save_token
        )
        self._oauth.resources = frozenset({audience, *resources})
        self._oauth.scopes_supported = list(SCOPES)
        self._oauth.register_grant(_ClientCredentialsGrant)
        self.app = self._flask_app()

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the authorization server was never started")
        return self._port

    @property
    def issuer(self) -> str:
        """The issuer identifier: the base URL (RFC 8414 §2)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + TOKEN_PATH

    @property
    def jwks_uri(self) -> str:
        return self.issuer + JWKS_PATH

    @property
    def metadata_url(self) -> str:
        return self.issuer + METADATA_PATH

    @property
    def client(self) -> Client:
        """The first configured client."""
        return next(iter(self.clients.values()))

    # -- control ---------------------------------------------------------------------------

    def hits(self, endpoint: str) -> int:
        """Requests received so far on ``token``, ``jwks`` or ``metadata`` (also those
        answered with an outage status)."""
        with self._lock:
            return self._hits[endpoint]

    def rotate(self, *, retire_previous: bool = False) -> str:
        """Sign new tokens with a fresh key, published next to the old ones (or instead of
        them); returns the new ``kid``."""
        previous = self.signing_key
        self.signing_key = self._new_key()
        if retire_previous:
            # Rebound, never mutated: the server thread may be reading the list.
            self._published = [key for key in self._published if key is not previous]
        return str(self.signing_key.kid)

    @property
    def published_kids(self) -> list[str]:
        return [str(key.kid) for key in self._published]

    def jwks(self) -> dict[str, Any]:
        """The published key set (public keys only)."""
        return {"keys": [key.as_dict(private=False) for key in self._published]}

    @contextlib.contextmanager
    def outage(
        self, status: int = 500, *, body: str = OUTAGE_PAGE, content_type: str = "text/html"
    ) -> Iterator[None]:
        """Within the block, the key set and metadata endpoints answer ``status`` with
        ``body`` (by default an HTML page, as a failing proxy would); the token endpoint
        keeps working."""
        self._outage = (status, body, content_type)
        try:
            yield
        finally:
            self._outage = None

    def start(self) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same port afterwards)."""
        if self._server is not None:
            raise RuntimeError("the authorization server is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self._port))
            listener.listen(64)
            # werkzeug duplicates the descriptor; ours is closed right after.
            server = make_server(
                "127.0.0.1",
                0,
                self.app,
                threaded=True,
                request_handler=_QuietHandler,
                fd=listener.fileno(),
            )
        finally:
            listener.close()
        if not self._port:
            self._port = server.port
            # After init_app (which registered a plain bearer generator as the default) and
            # once the issuer, our own URL, is known.
            self._oauth.register_token_generator("default", _TokenGenerator(self))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"authorization-server-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: new connections are refused until :meth:`start`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        try:
            server.shutdown()
        finally:
            server.server_close()
            if thread is not None:
                thread.join(5)
                if thread.is_alive():  # pragma: no cover - a bug, not a flake
                    raise RuntimeError("the authorization server thread did not stop")

    def __enter__(self) -> AuthorizationServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- authlib wiring --------------------------------------------------------------------

    def _new_key(self) -> RSAKey:
        key = RSAKey.generate_key(
            2048,
            parameters={"kid": secrets.token_urlsafe(8), "use": "sig", "alg": "RS256"},
            private=True,
        )
        self._published = [*self._published, key]
        return key

    def _save_token(self, token: dict[str, Any], request: object) -> None:
        self.issued.append(dict(token))

    def _count(self, endpoint: str) -> None:
        with self._lock:
            self._hits[endpoint] += 1

    def _outage_response(self) -> flask.Response | None:
        if self._outage is None:
            return None
        status, body, content_type = self._outage
        return flask.Response(body, status=status, content_type=content_type)

    def _metadata(self) -> dict[str, Any]:
        metadata = AuthorizationServerMetadata(
            {
                "issuer": self.issuer,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": self.jwks_uri,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "scopes_supported": list(SCOPES),
                # REQUIRED by RFC 8414 §2; there is no authorization endpoint, so no
                # response type issues anything.
                "response_types_supported": ["none"],
            }
        )
        metadata.validate()
        return dict(metadata)

    def _flask_app(self) -> flask.Flask:
        app = flask.Flask(__name__)
        self._oauth.init_app(app)

        @app.post(TOKEN_PATH)
        def token() -> flask.Response:
            self._count("token")
            response: flask.Response = self._oauth.create_token_response()
            return response

        @app.get(JWKS_PATH)
        def jwks() -> flask.Response:
            self._count("jwks")
            if (failed := self._outage_response()) is not None:
                return failed
            response = flask.jsonify(self.jwks())
            response.headers["Cache-Control"] = f"public, max-age={self.jwks_max_age}"
            return response

        @app.get(METADATA_PATH)
        def metadata() -> flask.Response:
            self._count("metadata")
            if (failed := self._outage_response()) is not None:
                return failed
            return flask.jsonify(self._metadata())

        return app


async def request_token(
    server: AuthorizationServer, scope: str, *, resource: str | None = None
) -> str:
    """An access token by the client-credentials grant over HTTP (RFC 6749 §4.4), the first
    client authenticating with HTTP Basic (§2.3.1)."""
    form = {"grant_type": "client_credentials", "scope": scope}
    if resource is not None:
        form["resource"] = resource
    client = server.client
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.post(
            server.token_endpoint, data=form, auth=(client.client_id, client.client_secret)
        )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == scope
    token: str = body["access_token"]
    return token


def unverified_segment(token: str, index: int) -> dict[str, Any]:
    """The JSON of a JWS segment (0: header, 1: claims), unverified: only to look at what
    the server issued."""
    segment = token.split(".")[index]
    value: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return value
