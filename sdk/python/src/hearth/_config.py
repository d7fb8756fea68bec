"""Where the daemon is and how to authenticate: arguments first, then ``HEARTH_HOST`` and
``HEARTH_TOKEN`` like the ``hearth sandbox`` CLI, whose default host this shares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import Unauthorized

#: The CLI's default (``hearth sandbox --host``).
DEFAULT_HOST = "http://127.0.0.1:8420"


@dataclass(frozen=True)
class Config:
    base: str
    """``http[s]://HOST:PORT``, no trailing slash."""
    token: str

    @staticmethod
    def resolve(host: Optional[str] = None, token: Optional[str] = None) -> Config:
        host = (host or os.environ.get("HEARTH_HOST") or DEFAULT_HOST).rstrip("/")
        if "://" not in host:
            host = f"http://{host}"
        token = token or os.environ.get("HEARTH_TOKEN") or ""
        if not token:
            raise Unauthorized(
                "no token: pass token= or set HEARTH_TOKEN to a token from the daemon's tokens file"
            )
        return Config(base=host, token=token)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def ws_url(self, path: str) -> str:
        scheme, rest = self.base.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"
