"""Version routing: one head implementation serves every version of an API.

See :class:`VersionMiddleware`, :class:`VersionBundle` and the declarative changes.
"""

from gemini_scale.versioning.bundle import Version, VersionBundle
from gemini_scale.versioning.changes import (
    MISSING,
    EndpointMoved,
    FieldAdded,
    FieldRemoved,
    FieldRenamed,
    ModelRenamed,
    RequestInfo,
    ResponseInfo,
    VersionChange,
)
from gemini_scale.versioning.gemini import (
    RETIRED_MODELS,
    LegacyAltParameter,
    ModelAlias,
    ModelAliases,
    ProtoJSONSpelling,
    StrictV1,
    gemini_versions,
)
from gemini_scale.versioning.middleware import API_VERSION_KEY, VersionMiddleware, api_version

__all__ = [
    "API_VERSION_KEY",
    "MISSING",
    "RETIRED_MODELS",
    "EndpointMoved",
    "FieldAdded",
    "FieldRemoved",
    "FieldRenamed",
    "LegacyAltParameter",
    "ModelAlias",
    "ModelAliases",
    "ModelRenamed",
    "ProtoJSONSpelling",
    "RequestInfo",
    "ResponseInfo",
    "StrictV1",
    "Version",
    "VersionBundle",
    "VersionChange",
    "VersionMiddleware",
    "api_version",
    "gemini_versions",
]
