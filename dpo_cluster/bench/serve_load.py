"""The load side of `dpo-cluster bench serve`: N client threads and one stopwatch for every backend.

Each request is timed from just before it is sent to its last byte; a streamed one also to its
first chunk that carries text (time to first token). A phase's wall time runs from its first
request sent to its last answer received, so requests/s and tokens/s include all the queueing the
server does. Token counts come from the responses' `usage`, never from re-tokenizing. Plain
urllib, so what is measured is the server and not a client library.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# Seconds one client waits for one answer: far above any answer here, so a stuck server shows as
# an error in the counts instead of a benchmark that never ends.
CLIENT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Sample:
    """One request: latency_s (sent to last byte), output_tokens (usage.completion_tokens, both
    sides summed for a compare), ttft_s (streamed only: sent to first chunk with text), error
    (None for a full 200 answer, else what went wrong)."""

    latency_s: float
    output_tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None


Send = Callable[[dict[str, Any]], Sample]


def build_request(url: str, body: dict[str, Any], key: str | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")


def describe_error(error: BaseException) -> str:
    """A short line for a failed request: the HTTP status and the start of its body, if any."""
    if isinstance(error, urllib.error.HTTPError):
        detail = error.read()[:200].decode("utf-8", "replace")
        return f"HTTP {error.code}: {detail}"
    return f"{type(error).__name__}: {error}"


def usage_tokens(payload: dict[str, Any]) -> int:
    """completion_tokens of a chat completion, or of both sides of a `/v1/compare` answer."""
    if "usage" in payload:
        return int(payload["usage"]["completion_tokens"])
    return sum(int(payload[side]["usage"]["completion_tokens"]) for side in ("base", "tuned"))


def json_sender(url: str, key: str | None) -> Send:
    """Sends one JSON request and reads the whole JSON answer."""

    def send(body: dict[str, Any]) -> Sample:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(build_request(url, body, key), timeout=CLIENT_TIMEOUT_S) as response:
                payload = json.loads(response.read())
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
            return Sample(time.perf_counter() - started, error=describe_error(error))
        return Sample(time.perf_counter() - started, usage_tokens(payload))

    return send


def stream_sender(url: str, key: str | None) -> Send:
    """Sends one `stream: true` request and reads its server-sent events as they arrive; the
    body should ask for `stream_options.include_usage`, whose last chunk gives the token count."""

    def send(body: dict[str, Any]) -> Sample:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            with urllib.request.urlopen(build_request(url, body, key), timeout=CLIENT_TIMEOUT_S) as response:
                for event in sse_payloads(response):
                    if "error" in event:
                        return Sample(time.perf_counter() - started, error=f"in stream: {event['error']}")
                    if first is None and chunk_text(event):
                        first = time.perf_counter() - started
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
        except (OSError, ValueError) as error:
            return Sample(time.perf_counter() - started, error=describe_error(error))
        return Sample(time.perf_counter() - started, tokens, ttft_s=first)

    return send


def sse_payloads(response: Any) -> Any:
    """The JSON payload of each `data:` line of a server-sent-events body, up to `[DONE]`."""
    for raw in response:  # http.client yields each line as soon as it has arrived
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def chunk_text(event: dict[str, Any]) -> str:
    """The text a chat-completion chunk adds ("" for the role chunk, the finish and the usage)."""
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def run_phase(send: Send, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next body as soon as its last answer is in (a
    closed loop). Returns the samples in the order of `bodies` and the phase's wall seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        samples = list(pool.map(send, bodies))
    return samples, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (q in [0, 100]) of values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """A phase's numbers: counts, rates over the wall time, latency and TTFT percentiles (over
    the answered requests), and each request's own numbers in the order they were sent."""
    answered = [s for s in samples if s.error is None]
    latencies = [s.latency_s for s in answered]
    ttfts = [s.ttft_s for s in answered if s.ttft_s is not None]
    output_tokens = sum(s.output_tokens for s in answered)
    return {
        "requests": len(samples),
        "answered": len(answered),
        "errors": len(samples) - len(answered),
        "first_error": next((s.error for s in samples if s.error is not None), None),
        "wall_s": wall_s,
        "requests_per_s": len(answered) / wall_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "per_request": {
            "latency_s": [s.latency_s for s in samples],
            "ttft_s": [s.ttft_s for s in samples],
            "output_tokens": [s.output_tokens for s in samples],
            "error": [s.error for s in samples],
        },
    }
