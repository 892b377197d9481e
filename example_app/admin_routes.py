"""Operator routes of the example gateway: cache invalidation (scope ``gemini.admin``)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Security
from starlette.responses import JSONResponse, Response

from gemini_scale import (
    ALL_TAG,
    CacheEngine,
    HTTPError,
    InvalidArgumentError,
    StoreError,
    model_tag,
    requires_scopes,
)
from gemini_scale.auth.dependencies import bearer_scheme
from gemini_scale.versioning import RETIRED_MODELS

ADMIN = "gemini.admin"
#: An entry key, as ``Cache-Status`` names it (``expose_key``): a digest's first 32 hex digits.
_ENTRY_KEY = re.compile(r"[0-9a-f]{32}")
#: A retired model's tag -> its successor's: the gateway serves (and caches) the retired
#: names under their successors (``VersionMiddleware`` rewrites the path first).
_SUCCESSORS = {model_tag(a.name): model_tag(a.successor) for a in RETIRED_MODELS}

router = APIRouter(dependencies=[Security(bearer_scheme)])


@router.delete("/admin/cache")
@requires_scopes(ADMIN)
async def invalidate_cache(
    request: Request,
    model: Annotated[list[str], Query(description="Drop every entry of these models.")] = [],  # noqa: B006
    tag: Annotated[list[str], Query(description="Drop every entry carrying these tags.")] = [],  # noqa: B006
    entry: Annotated[list[str], Query(description="Drop these entries (by key).")] = [],  # noqa: B006
    all: Annotated[bool, Query(description="Drop every entry.")] = False,
) -> Response:
    """Invalidate cached answers by model, tag or entry key (or all of them).

    Invalidation by tag is immediate on this replica and reaches the others within the
    engine's ``tag_refresh`` (one second by default).
    """
    engine: CacheEngine | None = request.app.state.cache_engine
    if engine is None:
        raise InvalidArgumentError("The response cache is disabled (GEMINI_SCALE_CACHE_TTL=0).")
    entry = entry or []
    models = [_SUCCESSORS.get(model_tag(name), model_tag(name)) for name in model or ()]
    tags = models + (tag or []) + ([ALL_TAG] if all else [])
    if not tags and not entry:
        raise InvalidArgumentError("Name what to invalidate: model, tag, entry or all=true.")
    named = [*(model or ()), *(tag or ())]
    if "" in named or any(_ENTRY_KEY.fullmatch(key) is None for key in entry):
        raise InvalidArgumentError(
            "A model or tag must not be empty; an entry is a key as Cache-Status names it "
            "(32 hexadecimal digits)."
        )
    if len(tags) + len(entry) > 100:
        raise InvalidArgumentError("At most 100 models, tags and entries per call.")
    try:
        count = await engine.invalidate(tags=tags, keys=entry)
    except StoreError:
        raise HTTPError(
            503, "The shared store is unreachable; retry.", headers={"retry-after": "1"}
        ) from None
    return JSONResponse(
        {"invalidated": count, "tags": tags, "entries": len(entry)},
        headers={"cache-control": "no-store"},
    )
