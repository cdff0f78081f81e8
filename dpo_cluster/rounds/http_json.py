"""A small JSON-over-HTTP client for the round's remote judges (an OpenAI-compatible endpoint, the
serve app's arena): the standard library only, the API key as a Bearer token, and errors that name
the URL and what the server said, so a wrong URL or key stops the round with a clear message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any


class JudgeHTTPError(RuntimeError):
    """A request to a judge endpoint failed: the URL, the status and the server's message."""


def api_key(env_name: str | None) -> str | None:
    """The key in environment variable `env_name` (None when no variable is named). Raises
    JudgeHTTPError when the variable is named but unset."""
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise JudgeHTTPError(f"rounds.api_key_env: environment variable {env_name} is not set")
    return value


def request_json(
    method: str, url: str, body: dict[str, Any] | None, *, key: str | None, timeout_s: float
) -> Any:
    """Send one request and return the decoded JSON answer (None for an empty body)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        message = error.read().decode("utf-8", "replace")[:500]
        raise JudgeHTTPError(f"{method} {url}: HTTP {error.code}: {message}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise JudgeHTTPError(f"{method} {url}: {getattr(error, 'reason', error)}") from None
    return json.loads(raw) if raw.strip() else None
