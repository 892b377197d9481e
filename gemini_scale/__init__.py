"""gemini-scale: pure-ASGI middlewares that make a Gemini-fronting service scale.

Only the names in ``__all__`` are public; a test keeps the list honest.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from gemini_scale.auth.api_keys import APIKeyEntry, APIKeys
    from gemini_scale.auth.base import TokenVerifier
    from gemini_scale.auth.dependencies import current_principal
    from gemini_scale.auth.errors import (
        AuthError,
        IdentityProviderUnavailableError,
        InsufficientScopeError,
        InvalidRequestError,
        InvalidTokenError,
        MissingCredentialsError,
    )
    from gemini_scale.auth.introspection import IntrospectionValidator
    from gemini_scale.auth.jwt import Issuer, JWTValidator
    from gemini_scale.auth.middleware import OAuth2Middleware, principal_of
    from gemini_scale.auth.user import PrincipalUser
    from gemini_scale.body import JSONBodyMiddleware
    from gemini_scale.caching import (
        ALL_TAG,
        CacheEngine,
        CacheMiddleware,
        model_tag,
        principal_tag,
        tenant_tag,
    )
    from gemini_scale.errors import (
        ConfigurationError,
        GeminiScaleError,
        HTTPError,
        InvalidArgumentError,
        NotFoundError,
        PayloadTooLargeError,
        PolicyNotEnforcedError,
        StoreError,
        StoreUnavailableError,
        UnsupportedMediaTypeError,
        UpstreamError,
        UpstreamTimeoutError,
        UpstreamUnavailableError,
        error_body,
        error_response,
        send_error,
    )
    from gemini_scale.handlers import install_error_handlers
    from gemini_scale.keys import (
        TrustedProxies,
        client_address,
        client_ip_key,
        model_key,
        principal_key,
        route_key,
        tenant_key,
    )
    from gemini_scale.policies import (
        CachePolicy,
        Policy,
        PublicPolicy,
        RateLimitPolicy,
        ScopePolicy,
        VersionPolicy,
        cache,
        mark,
        parse_limits,
        policies_of,
        public,
        rate_limit,
        requires_scopes,
        version,
    )
    from gemini_scale.principal import Principal
    from gemini_scale.ratelimit.engine import Decision, Limit, RateLimiter
    from gemini_scale.ratelimit.middleware import IPRateLimitMiddleware, RateLimitMiddleware
    from gemini_scale.ratelimit.usage import UsageObserver, estimate_request_tokens
    from gemini_scale.routing import (
        GeminiMiddleware,
        RequestContext,
        RouteMatch,
        RouteTable,
        Rules,
        policy_for,
        route_table,
    )
    from gemini_scale.settings import GeminiScaleSettings, load_settings
    from gemini_scale.stores import MemoryStore, RedisStore, Script, Store, store_from_url
    from gemini_scale.types import Clock, SystemClock
    from gemini_scale.upstream import GeminiUpstream, StreamingASGITransport, UpstreamResponse

__version__ = "0.1.0"

# Names resolve on first use (PEP 562), so importing gemini_scale costs only what a service
# actually uses: a stack without Redis never imports redis-py, one without the upstream
# client never imports httpx.
_LAZY: dict[str, str] = {
    "ALL_TAG": "gemini_scale.caching",
    "APIKeyEntry": "gemini_scale.auth.api_keys",
    "APIKeys": "gemini_scale.auth.api_keys",
    "AuthError": "gemini_scale.auth.errors",
    "CacheEngine": "gemini_scale.caching",
    "CacheMiddleware": "gemini_scale.caching",
    "CachePolicy": "gemini_scale.policies",
    "Clock": "gemini_scale.types",
    "ConfigurationError": "gemini_scale.errors",
    "Decision": "gemini_scale.ratelimit.engine",
    "GeminiMiddleware": "gemini_scale.routing",
    "GeminiScaleError": "gemini_scale.errors",
    "GeminiScaleSettings": "gemini_scale.settings",
    "GeminiUpstream": "gemini_scale.upstream",
    "HTTPError": "gemini_scale.errors",
    "IPRateLimitMiddleware": "gemini_scale.ratelimit.middleware",
    "IdentityProviderUnavailableError": "gemini_scale.auth.errors",
    "InsufficientScopeError": "gemini_scale.auth.errors",
    "IntrospectionValidator": "gemini_scale.auth.introspection",
    "InvalidArgumentError": "gemini_scale.errors",
    "InvalidRequestError": "gemini_scale.auth.errors",
    "InvalidTokenError": "gemini_scale.auth.errors",
    "Issuer": "gemini_scale.auth.jwt",
    "JSONBodyMiddleware": "gemini_scale.body",
    "JWTValidator": "gemini_scale.auth.jwt",
    "Limit": "gemini_scale.ratelimit.engine",
    "MemoryStore": "gemini_scale.stores",
    "MissingCredentialsError": "gemini_scale.auth.errors",
    "NotFoundError": "gemini_scale.errors",
    "OAuth2Middleware": "gemini_scale.auth.middleware",
    "PayloadTooLargeError": "gemini_scale.errors",
    "Policy": "gemini_scale.policies",
    "PolicyNotEnforcedError": "gemini_scale.errors",
    "Principal": "gemini_scale.principal",
    "PrincipalUser": "gemini_scale.auth.user",
    "PublicPolicy": "gemini_scale.policies",
    "RateLimitMiddleware": "gemini_scale.ratelimit.middleware",
    "RateLimitPolicy": "gemini_scale.policies",
    "RateLimiter": "gemini_scale.ratelimit.engine",
    "RedisStore": "gemini_scale.stores.redis",
    "RequestContext": "gemini_scale.routing",
    "RouteMatch": "gemini_scale.routing",
    "RouteTable": "gemini_scale.routing",
    "Rules": "gemini_scale.routing",
    "ScopePolicy": "gemini_scale.policies",
    "Script": "gemini_scale.stores",
    "Store": "gemini_scale.stores",
    "StoreError": "gemini_scale.errors",
    "StoreUnavailableError": "gemini_scale.errors",
    "StreamingASGITransport": "gemini_scale.upstream",
    "SystemClock": "gemini_scale.types",
    "TokenVerifier": "gemini_scale.auth.base",
    "TrustedProxies": "gemini_scale.keys",
    "UnsupportedMediaTypeError": "gemini_scale.errors",
    "UpstreamError": "gemini_scale.errors",
    "UpstreamResponse": "gemini_scale.upstream",
    "UpstreamTimeoutError": "gemini_scale.errors",
    "UpstreamUnavailableError": "gemini_scale.errors",
    "UsageObserver": "gemini_scale.ratelimit.usage",
    "VersionPolicy": "gemini_scale.policies",
    "cache": "gemini_scale.policies",
    "client_address": "gemini_scale.keys",
    "client_ip_key": "gemini_scale.keys",
    "current_principal": "gemini_scale.auth.dependencies",
    "error_body": "gemini_scale.errors",
    "error_response": "gemini_scale.errors",
    "estimate_request_tokens": "gemini_scale.ratelimit.usage",
    "install_error_handlers": "gemini_scale.handlers",
    "load_settings": "gemini_scale.settings",
    "mark": "gemini_scale.policies",
    "model_key": "gemini_scale.keys",
    "model_tag": "gemini_scale.caching",
    "parse_limits": "gemini_scale.policies",
    "policies_of": "gemini_scale.policies",
    "policy_for": "gemini_scale.routing",
    "principal_key": "gemini_scale.keys",
    "principal_of": "gemini_scale.auth.middleware",
    "principal_tag": "gemini_scale.caching",
    "public": "gemini_scale.policies",
    "rate_limit": "gemini_scale.policies",
    "requires_scopes": "gemini_scale.policies",
    "route_key": "gemini_scale.keys",
    "route_table": "gemini_scale.routing",
    "send_error": "gemini_scale.errors",
    "store_from_url": "gemini_scale.stores.factory",
    "tenant_key": "gemini_scale.keys",
    "tenant_tag": "gemini_scale.caching",
    "version": "gemini_scale.policies",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gemini_scale' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("_"))})


__all__ = [
    "ALL_TAG",
    "APIKeyEntry",
    "APIKeys",
    "AuthError",
    "CacheEngine",
    "CacheMiddleware",
    "CachePolicy",
    "Clock",
    "ConfigurationError",
    "Decision",
    "GeminiMiddleware",
    "GeminiScaleError",
    "GeminiScaleSettings",
    "GeminiUpstream",
    "HTTPError",
    "IPRateLimitMiddleware",
    "IdentityProviderUnavailableError",
    "InsufficientScopeError",
    "IntrospectionValidator",
    "InvalidArgumentError",
    "InvalidRequestError",
    "InvalidTokenError",
    "Issuer",
    "JSONBodyMiddleware",
    "JWTValidator",
    "Limit",
    "MemoryStore",
    "MissingCredentialsError",
    "NotFoundError",
    "OAuth2Middleware",
    "PayloadTooLargeError",
    "Policy",
    "PolicyNotEnforcedError",
    "Principal",
    "PrincipalUser",
    "PublicPolicy",
    "RateLimitMiddleware",
    "RateLimitPolicy",
    "RateLimiter",
    "RedisStore",
    "RequestContext",
    "RouteMatch",
    "RouteTable",
    "Rules",
    "ScopePolicy",
    "Script",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "StreamingASGITransport",
    "SystemClock",
    "TokenVerifier",
    "TrustedProxies",
    "UnsupportedMediaTypeError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "UsageObserver",
    "VersionPolicy",
    "__version__",
    "cache",
    "client_address",
    "client_ip_key",
    "current_principal",
    "error_body",
    "error_response",
    "estimate_request_tokens",
    "install_error_handlers",
    "load_settings",
    "mark",
    "model_key",
    "model_tag",
    "parse_limits",
    "policies_of",
    "policy_for",
    "principal_key",
    "principal_of",
    "principal_tag",
    "public",
    "rate_limit",
    "requires_scopes",
    "route_key",
    "route_table",
    "send_error",
    "store_from_url",
    "tenant_key",
    "tenant_tag",
    "version",
]
