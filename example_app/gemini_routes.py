"""The Gemini surface of the example gateway: one head implementation for every version prefix."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Security
from starlette.responses import Response

from gemini_scale import (
    InvalidArgumentError,
    NotFoundError,
    client_path,
    requires_scopes,
    route_path,
)
from gemini_scale.auth.dependencies import bearer_scheme
from gemini_scale.upstream import GeminiUpstream

READ = "gemini.read"
GENERATE = "gemini.generate"

#: Model ids as Google spells them (``gemini-2.5-flash``, ``tunedModels`` are out of scope).
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# The bearer scheme makes /docs show "Authorize"; OAuth2Middleware has validated already.
router = APIRouter(dependencies=[Security(bearer_scheme)])


def _upstream(request: Request) -> GeminiUpstream:
    upstream: GeminiUpstream = request.app.state.upstream
    return upstream


def _version(request: Request) -> str:
    """The version segment the app routed on (a ``root_path`` is not part of it)."""
    return route_path(request.scope).split("/", 2)[1]


def _model_path(request: Request, model: str, method: str | None = None) -> str:
    if not _MODEL_ID.fullmatch(model):
        raise InvalidArgumentError(f"Invalid model name {model[:64]!r}.")
    path = f"/{_version(request)}/models/{model}"
    return f"{path}:{method}" if method else path


async def _call(request: Request, model: str, method: str) -> Response:
    return await _upstream(request).forward(request, path=_model_path(request, model, method))


# GET first: a 405 names the first route of the path that matched (``Allow: GET``).
@router.head("/models", include_in_schema=False)
@router.get("/models")
@requires_scopes(READ)
async def list_models(request: Request) -> Response:
    """``models.list``: the upstream's model list, paged."""
    return await _upstream(request).forward(request, path=f"/{_version(request)}/models")


@router.head("/models/{model}", include_in_schema=False)
@router.get("/models/{model}")
@requires_scopes(READ)
async def get_model(request: Request, model: str) -> Response:
    """``models.get``."""
    if ":" in model:
        raise NotFoundError(
            f"Method not found: {request.method} {client_path(request.scope)[:200]}."
        )
    return await _upstream(request).forward(request, path=_model_path(request, model))


@router.post("/models/{model}:generateContent")
@requires_scopes(GENERATE)
async def generate_content(request: Request, model: str) -> Response:
    """``generateContent``."""
    return await _call(request, model, "generateContent")


@router.post("/models/{model}:streamGenerateContent")
@requires_scopes(GENERATE)
async def stream_generate_content(request: Request, model: str) -> Response:
    """``streamGenerateContent``: SSE with ``alt=sse``, a JSON array without; never buffered."""
    return await _call(request, model, "streamGenerateContent")


@router.post("/models/{model}:countTokens")
@requires_scopes(GENERATE)
async def count_tokens(request: Request, model: str) -> Response:
    """``countTokens``."""
    return await _call(request, model, "countTokens")


@router.post("/models/{model}:embedContent")
@requires_scopes(GENERATE)
async def embed_content(request: Request, model: str) -> Response:
    """``embedContent``."""
    return await _call(request, model, "embedContent")


@router.post("/models/{model}:batchEmbedContents")
@requires_scopes(GENERATE)
async def batch_embed_contents(request: Request, model: str) -> Response:
    """``batchEmbedContents`` (what google-genai calls for every embedding)."""
    return await _call(request, model, "batchEmbedContents")


@router.post("/models/{name}", include_in_schema=False)
async def unknown_method(request: Request, name: str) -> Response:
    """Any other custom method is 404, as Google answers (not 405 from ``GET models/{m}``)."""
    raise NotFoundError(f"Method not found: POST {client_path(request.scope)[:200]}.")
