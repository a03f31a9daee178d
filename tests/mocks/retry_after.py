"""An httpx transport that answers the first requests with 429 and a Retry-After, to test the SDK's waits."""

from __future__ import annotations

import httpx


class RetryAfterTransport(httpx.BaseTransport):
    """The first ``busy`` requests get 429 with ``Retry-After: retry_after`` (not reaching the server)."""

    def __init__(self, *, busy: int, retry_after: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.busy = busy
        self.retry_after = retry_after
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.busy > 0:
            self.busy -= 1
            body = {"error": "too_busy", "message": "busy", "retryable": True}
            return httpx.Response(429, json=body, headers={"Retry-After": self.retry_after})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
