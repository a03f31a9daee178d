"""An httpx transport that fails on purpose, to test the SDK's retries."""

from __future__ import annotations

import httpx


class FlakyTransport(httpx.BaseTransport):
    """Forwards to a real transport, but fails the first requests it is told to.

    ``refuse`` requests get a 503 without reaching the server; ``drop_after``
    requests reach the server and then lose their response (a connection
    error), which is the case an idempotency key exists for.
    """

    def __init__(self, *, refuse: int = 0, drop_after: int = 0) -> None:
        self.inner = httpx.HTTPTransport()
        self.refuse = refuse
        self.drop_after = drop_after
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if request.method == "POST" and self.refuse > 0:
            self.refuse -= 1
            return httpx.Response(503, json={"error": "unavailable", "message": "try again"})
        response = self.inner.handle_request(request)
        if request.method == "POST" and self.drop_after > 0:
            self.drop_after -= 1
            response.read()
            raise httpx.ReadError("connection reset after the server answered", request=request)
        return response

    def close(self) -> None:
        self.inner.close()
