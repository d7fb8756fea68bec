"""Feature detection: which optional routes this daemon has, read from its ``GET /openapi.json``
(fetched once per client). A missing route becomes :class:`hearth.Unsupported` with a message naming
the feature and the route, instead of a bare 404 from the router."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Unsupported


@dataclass(frozen=True)
class Feature:
    name: str
    method: str
    path: str
    """The route's template, e.g. ``/v1/sandboxes/{id}/pause``."""


NETWORK = Feature("the network policy", "put", "/v1/sandboxes/{id}/network")
PORTS = Feature("port proxying", "get", "/v1/sandboxes/{id}/ports/{port}/{path}")
PAUSE = Feature("pause", "post", "/v1/sandboxes/{id}/pause")
RESUME = Feature("resume", "post", "/v1/sandboxes/{id}/resume")
FORK = Feature("fork", "post", "/v1/sandboxes/{id}/fork")
CODE = Feature("the code interpreter", "post", "/v1/sandboxes/{id}/code")
CODE_RESET = Feature("resetting the code interpreter", "delete", "/v1/sandboxes/{id}/code")
PROCESSES = Feature("background processes", "post", "/v1/sandboxes/{id}/processes")


def _shape(path: str) -> str:
    """A template with its parameter names erased: ``/a/{id}`` and ``/a/{sid}`` are one route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


class Features:
    """The routes an OpenAPI document lists."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        paths = document.get("paths")
        self._routes = {
            (method.lower(), _shape(path))
            for path, item in (paths.items() if isinstance(paths, dict) else [])
            if isinstance(item, dict)
            for method in item
        }

    def has(self, feature: Feature) -> bool:
        return (feature.method, _shape(feature.path)) in self._routes

    def require(self, feature: Feature) -> None:
        if not self.has(feature):
            raise Unsupported(
                f"this hearth daemon does not offer {feature.name} "
                f"({feature.method.upper()} {feature.path} is not in its /openapi.json); "
                "a newer daemon may"
            )
