"""FastAPI integration: the current principal as a dependency, and the bearer scheme in
OpenAPI so ``/docs`` shows "Authorize"."""

from __future__ import annotations

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gemini_scale.auth.middleware import principal_of
from gemini_scale.errors import HTTPError
from gemini_scale.principal import Principal

#: The OpenAPI security scheme. It never validates anything itself (``auto_error=False``):
#: ``OAuth2Middleware`` has already done that before routing.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="An OAuth 2.0 access token, validated by gemini-scale's OAuth2Middleware.",
)


async def current_principal(
    request: Request,
    _credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),  # noqa: B008
) -> Principal:
    """The verified caller (``Depends(current_principal)``).

    401 when the route is not behind ``OAuth2Middleware`` or is public and the caller sent
    nothing, so an endpoint that needs a principal never runs without one.
    """
    principal = principal_of(request.scope)
    if principal is None:
        raise HTTPError(
            401,
            "Authentication is required.",
            headers={"www-authenticate": 'Bearer realm="gemini-scale"'},
        )
    return principal
