"""The example gateway, built only from gemini-scale's public API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from example_app.admin_routes import router as admin_router
from example_app.dev_issuer import WARNING, DevIssuer
from example_app.gemini_routes import router
from example_app.standin import create_standin
from gemini_scale import (
    APIKeys,
    BodyTimeoutMiddleware,
    CacheEngine,
    CacheMiddleware,
    CachePolicy,
    ConfigurationError,
    GeminiScaleSettings,
    GeminiUpstream,
    IPRateLimitMiddleware,
    Issuer,
    JSONBodyMiddleware,
    MemoryStore,
    MetricsMiddleware,
    OAuth2Middleware,
    Policy,
    RateLimitMiddleware,
    RateLimitPolicy,
    StoreError,
    StreamingASGITransport,
    UsageAnomalyDetector,
    VersionBundle,
    VersionMiddleware,
    error_response,
    gemini_versions,
    install_error_handlers,
    metrics_body,
    store_from_url,
)
from gemini_scale.types import ASGIApp
from gemini_scale.versioning import RETIRED_MODELS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger("example_app")

#: The Gemini surface is implemented once, at the head version; VersionMiddleware serves
#: ``/v1`` (and retired model names) from it.
HEAD_PREFIX = "/v1beta"
#: Reachable without a credential: probes, metrics and the API docs (and the dev issuer).
PUBLIC_PATHS = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
)
#: Probes and scrapes: neither rate limiter sees them, so they are never refused with 429 and
#: never count against anyone's quota.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
STANDIN_URL = "http://gemini-standin.invalid"
#: The in-process cache's bound when there is no shared store.
CACHE_MEMORY_BYTES = 256 * 1024 * 1024
#: How many keys the per-address limiter's own in-process store holds when there is no
#: shared store (one per client address, or IPv6 /64, and limit; the least recently used
#: is evicted first).
IP_MEMORY_KEYS = 100_000


def create_upstream(
    settings: GeminiScaleSettings, standin: ASGIApp | None = None
) -> GeminiUpstream:
    """The upstream client: Google (or ``GEMINI_SCALE_UPSTREAM_URL``), else the stand-in."""
    base_url = settings.effective_upstream_url
    if base_url is None:
        return GeminiUpstream(
            base_url=STANDIN_URL,
            transport=StreamingASGITransport(standin or create_standin()),
            timeout=settings.upstream_timeout,
        )
    return GeminiUpstream(
        base_url=base_url, api_keys=settings.api_keys, timeout=settings.upstream_timeout
    )


def create_app(
    settings: GeminiScaleSettings,
    *,
    standin: ASGIApp | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the gateway from validated settings (see ``docs/configuration.md``).

    ``standin`` replaces the offline stand-in upstream (tests use it to control timing);
    ``registry`` replaces prometheus-client's global registry (tests count exactly).
    """
    tracing = configure_tracing(settings)
    dev_issuer = (
        DevIssuer(audience=settings.oauth_audience or "gemini-scale")
        if settings.dev_issuer
        else None
    )

    try:
        store = store_from_url(settings.redis_url)  # opens no connection
    except ConfigurationError as exc:
        raise ConfigurationError(f"GEMINI_SCALE_REDIS_URL: {exc}") from None
    # Without Redis the cache gets a memory store of its own, bounded by bytes: cached
    # answers must never crowd the rate limiters' counters out of a shared LRU.
    cache_store = store if settings.redis_url else MemoryStore(max_bytes=CACHE_MEMORY_BYTES)
    # Likewise the per-address limiter: unauthenticated clients choose their addresses, so
    # in a shared LRU their counters would evict the principals' counters, and a spent
    # budget would come back. (Redis keys expire with their windows and are not evicted.)
    ip_store = store if settings.redis_url else MemoryStore(max_keys=IP_MEMORY_KEYS)
    cache_engine = CacheEngine(cache_store) if settings.cache_ttl > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if dev_issuer is not None:
            logger.warning(WARNING)
        async with create_upstream(settings, standin) as upstream:
            app.state.store = store
            app.state.upstream = upstream
            try:
                yield
            finally:
                await store.aclose()

    app = FastAPI(
        title="gemini-scale example gateway",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # No redirects: a trailing slash is a 404 in Google's envelope, like any unknown
        # path (a redirect would have no such body, point at the client's Host, and send
        # a /v1 client to the /v1beta path the version layer rewrote it to).
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.dev_issuer = dev_issuer
    app.state.cache_engine = cache_engine
    app.include_router(router, prefix=HEAD_PREFIX, tags=["gemini"])
    app.include_router(admin_router, tags=["admin"])

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        try:
            await request.app.state.store.ping()
        except StoreError:
            return error_response(
                503, "The shared store is unreachable.", headers={"retry-after": "1"}
            )
        return JSONResponse({"status": "ready"}, headers={"cache-control": "no-store"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, media_type = metrics_body(registry)
        return Response(body, media_type=media_type)

    if dev_issuer is not None:
        dev_issuer.install(app)

    install_error_handlers(app)
    # Innermost first (DESIGN.md §3): the per-address limit runs before any cryptography,
    # the body is read only after authentication passed, the principal's request and
    # token budgets (per model) are checked on the parsed body, and the cache answers
    # last, so a hit has passed every check and charges its request but no tokens.
    # Probes and scrapes (UNLIMITED_PATHS) are exempt from both limiters.
    if cache_engine is not None:
        app.add_middleware(
            CacheMiddleware,
            engine=cache_engine,
            rules=cache_rules(settings.cache_ttl),
            generation=settings.cache_generation,
        )
    app.add_middleware(
        RateLimitMiddleware,
        store=store,
        on_store_error=settings.on_store_error,
        trusted_proxies=settings.trusted_proxy_list,
        max_body_bytes=settings.max_body_bytes,
        default=RateLimitPolicy.parse(
            settings.rate_limit, tokens=settings.token_limit, key=("principal", "model")
        ),
        exempt=UNLIMITED_PATHS,
    )
    app.add_middleware(
        JSONBodyMiddleware,
        max_body_bytes=settings.max_body_bytes,
        path_prefixes=(f"{HEAD_PREFIX}/",),
    )
    app.add_middleware(
        OAuth2Middleware,
        issuers=trusted_issuers(settings, dev_issuer),
        api_keys=APIKeys.from_env(settings.client_api_keys)
        if settings.client_api_keys.strip()
        else None,
        public_paths=(*PUBLIC_PATHS, "/dev/") if dev_issuer is not None else PUBLIC_PATHS,
    )
    app.add_middleware(
        IPRateLimitMiddleware,
        limit=settings.ip_rate_limit,
        store=ip_store,
        on_store_error=settings.on_store_error,
        trusted_proxies=settings.trusted_proxy_list,
        exempt=UNLIMITED_PATHS,
    )
    app.add_middleware(
        VersionMiddleware,
        versions=api_versions(strict_v1=settings.strict_v1),
        exempt=PUBLIC_PATHS,
        max_body_bytes=settings.max_body_bytes,
    )
    # Outside every layer that reads a body: a client that dribbles one gets 408 (D06).
    app.add_middleware(BodyTimeoutMiddleware)
    app.add_middleware(
        MetricsMiddleware,
        registry=registry,
        trusted_proxies=settings.trusted_proxy_list,
        access_log=settings.access_log,
        anomalies=UsageAnomalyDetector(store=store, factor=settings.anomaly_factor,
                                       registry=registry)
        if settings.anomaly_factor else None,
        tracing=tracing,
    )
    return app


def configure_tracing(settings: GeminiScaleSettings) -> bool:
    """With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, export traces there (OTLP over HTTP) and
    say that tracing is on; needs the ``otel`` extra."""
    if not settings.otel_exporter_otlp_endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigurationError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry extra is not "
            "installed: pip install 'gemini-scale[otel]'"
        ) from None
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "gemini-scale"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_*
        trace.set_tracer_provider(provider)
    return True


def api_versions(*, strict_v1: bool = False) -> VersionBundle:
    """Gemini's ``/v1`` and ``/v1beta`` from the ``/v1beta`` head, with the retired-model
    table (``GEMINI_SCALE_STRICT_V1``: ``/v1`` held to its published proto)."""
    return gemini_versions(aliases=RETIRED_MODELS, strict_v1=strict_v1)


def api_changelog() -> str:
    """The gateway's API versions page, ``docs/api-versions.md`` (a test keeps it current)."""
    return api_versions(strict_v1=True).changelog(
        "API versions of the example gateway",
        "Generated from `example_app.app.api_changelog()`. The strict-v1 line applies only with "
        "`GEMINI_SCALE_STRICT_V1=1`. See [Versions](versioning.md) for how versions work.",
    )


def cache_rules(ttl: float) -> dict[str, Policy]:
    """What the gateway caches for ``ttl`` seconds: the model list and model details for
    everyone (they come from the server's own key), token counts and embeddings per caller,
    and generation per caller as ``GEMINI_SCALE_CACHE_GENERATION`` allows (streams too)."""
    shared = CachePolicy(ttl=ttl, scope="shared")
    own = CachePolicy(ttl=ttl, methods=frozenset({"POST"}))
    streamed = CachePolicy(ttl=ttl, methods=frozenset({"POST"}), streams=True)
    # Head paths only: the cache sits behind VersionMiddleware, so one entry serves /v1 and
    # /v1beta clients alike.
    rules: dict[str, Policy] = {
        f"GET {HEAD_PREFIX}/models": shared,
        f"GET {HEAD_PREFIX}/models/{{model}}": shared,
        f"POST {HEAD_PREFIX}/models/{{model}}:streamGenerateContent": streamed,
    }
    for method in ("countTokens", "embedContent", "batchEmbedContents", "generateContent"):
        rules[f"POST {HEAD_PREFIX}/models/{{model}}:{method}"] = own
    return rules


def trusted_issuers(settings: GeminiScaleSettings, dev_issuer: DevIssuer | None) -> list[Issuer]:
    """``GEMINI_SCALE_OAUTH_ISSUER`` (keys by discovery or ``GEMINI_SCALE_OAUTH_JWKS_URL``) and,
    when on, the dev issuer (its key set is handed over directly: nothing to fetch)."""
    issuers = []
    if settings.oauth_issuer is not None:
        assert settings.oauth_audience is not None  # load_settings requires it
        issuers.append(
            Issuer(
                issuer=settings.oauth_issuer,
                audience=settings.oauth_audience,
                jwks_url=settings.oauth_jwks_url,
            )
        )
    if dev_issuer is not None:
        issuers.append(
            Issuer(issuer=dev_issuer.issuer, audience=dev_issuer.audience, jwks=dev_issuer.jwks())
        )
    return issuers
