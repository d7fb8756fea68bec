"""What the Python benches share: a minimal client of hearth's HTTP API (one keep-alive connection,
bearer token, JSON bodies; a non-`expect` status ends the bench with the answer) and a percentile.
Standard library only; the benches import it from their own directory."""

import http.client
import json
import sys
import urllib.parse


def percentile(values, p):
    """The p-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Api:
    def __init__(self, host, token, timeout=600):
        url = urllib.parse.urlparse(host)
        self.host, self.port = url.hostname, url.port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, method, path, body=None, expect=200, conn=None):
        """The answer's body; `conn` instead of the shared connection (for another thread)."""
        conn = conn or self.conn
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=self.headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != expect:
            sys.exit(f"{method} {path}: {resp.status} {raw[:300]!r}")
        return raw
