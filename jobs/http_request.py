"""Make one HTTP request, e.g. to call a web hook or ping a health check on schedule.

Arguments:
    url:     the http:// or https:// URL to request.
    method:  the HTTP method, default ``"GET"``.
    body:    optional request body: a string is sent as is (UTF-8), any other JSON value
             (object, array, number...) is sent as JSON with ``Content-Type: application/json``.
    headers: optional object of request headers, e.g. ``{"Authorization": "Bearer ..."}``.
    timeout: seconds to wait for the connection and for each read, default 30.

Result:
    ``{"status": 200, "url": "<final URL, after redirects>", "elapsed_ms": 12.3,
    "body": "<the first 2000 characters of the response text>"}``

A response with a status of 400 or more raises an error naming the status and the URL, so
the task ends in ``err``; so do connection errors and timeouts. Proxy settings are taken
from the environment (``HTTPS_PROXY``, ``NO_PROXY``...).
"""

from __future__ import annotations

import time
from typing import Any

import requests

BODY_LIMIT = 2000


class HTTPStatusError(RuntimeError):
    """The server answered with an error status (400 or more)."""


def run(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> dict[str, Any]:
    """Request ``url`` and return its status, final URL, duration and the start of its body."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
    if not isinstance(method, str) or not method.isalpha():
        raise ValueError(f"method must be an HTTP method such as 'GET', got {method!r}")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError(f"headers must be an object, got {type(headers).__name__}")
    method = method.upper()
    kwargs: dict[str, Any] = {"headers": headers, "timeout": timeout}
    if isinstance(body, str):
        kwargs["data"] = body.encode("utf-8")
    elif body is not None:
        kwargs["json"] = body
    started = time.perf_counter()
    response = requests.request(method, url, **kwargs)
    text = response.text
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    if response.status_code >= 400:
        raise HTTPStatusError(
            f"HTTP {response.status_code} {response.reason} from {method} {response.url}"
        )
    return {
        "status": response.status_code,
        "url": response.url,
        "elapsed_ms": elapsed_ms,
        "body": text[:BODY_LIMIT],
    }
