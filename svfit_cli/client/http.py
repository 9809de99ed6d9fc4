"""A small HTTP client for the service's public API: JSON calls, streamed downloads and event streams, with
OpenAI-style error envelopes turned into `ApiError(code, message)`.

Retries follow the same rule as the official client, narrowed to what is safe to repeat: connection
failures, 429 and 5xx are retried for reads, and for writes only when they carry an `Idempotency-Key`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
MAX_ATTEMPTS = 3


class ApiError(Exception):
    """The API answered with an error envelope (or something that is not the API answered)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class ApiUnreachable(Exception):
    """No HTTP answer at all: refused, timed out, DNS."""


def error_from(response: httpx.Response) -> ApiError:
    """The envelope's code and message; for a non-API answer (a proxy's HTML page), the HTTP status."""
    try:
        body = response.json()["error"]
        return ApiError(response.status_code, body.get("code") or body.get("type") or "error",
                        body.get("message") or "", body.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)


def _retry_delay(response: httpx.Response | None, attempt: int) -> float:
    if response is not None:
        try:
            return min(float(response.headers.get("retry-after", "")), 30.0)
        except ValueError:
            pass
    return 0.5 * 2**attempt


class ApiClient:
    """One connection pool to one API base URL, sending the key on every request."""

    def __init__(self, api_base: str, api_key: str | None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.api_base = api_base.rstrip("/")
        headers = {"User-Agent": "svfit-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.api_base + "/", headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,  # tests pass an httpx.MockTransport
        )

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        retryable = request.method == "GET" or "idempotency-key" in request.headers
        for attempt in range(MAX_ATTEMPTS):
            last = attempt == MAX_ATTEMPTS - 1 or not retryable
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if last:
                    raise ApiUnreachable(f"{request.method} {request.url}: {exc or type(exc).__name__}") from exc
                time.sleep(_retry_delay(None, attempt))
                continue
            if response.is_success:
                return response
            if last or response.status_code not in RETRY_STATUSES:
                response.read()
                response.close()
                raise error_from(response)
            response.close()
            time.sleep(_retry_delay(response, attempt))
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its decoded JSON body."""
        response = self._send(self._http.build_request(method, path.lstrip("/"), **kwargs))
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, **kwargs: Any) -> Any:
        return self.call("POST", path, json=body, **kwargs)

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives (downloads, server-sent events)."""
        response = self._send(self._http.build_request(method, path.lstrip("/"), **kwargs), stream=True)
        try:
            yield response
        finally:
            response.close()

    def pages(self, path: str, *, limit: int = 100, **params: Any) -> Iterator[dict]:
        """Every item of a cursor list, following `has_more` / `after=<last_id>`."""
        after = None
        while True:
            page = self.get(path, limit=limit, after=after, **params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]


def server_sent_events(response: httpx.Response) -> Iterator[dict]:
    """The JSON payloads of a `text/event-stream` answer until `data: [DONE]`; an error payload raises."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, other fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            error = payload["error"]
            raise ApiError(response.status_code, error.get("code") or error.get("type") or "error",
                           error.get("message") or "", error.get("param"))
        yield payload
