"""`dpo-cluster bench serve`: what a side-by-side comparison costs next to one generation.

The same prompts go, at the same concurrency, to `/v1/chat/completions` (one model) and to
`/v1/compare` (both); latency p50/p95, requests/s and tokens are printed with the ratio. Both models
of a comparison run concurrently (with an adapter, in the same batches), so a ratio well under 2x
is the point of the design. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPTS = [
    "Suggest a title for a video about sourdough bread",
    "Write a short title for a talk on distributed training",
    "A catchy title for a travel vlog in Lisbon",
    "Title for a tutorial on Ray Serve",
]


def build_demo_adapter(out_dir: Path) -> Path:
    """A LoRA adapter over builtin:tiny with non-zero weights, saved with its tokenizer."""
    from transformers import AutoTokenizer

    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.tiny import build_lora_adapter

    base = resolve_name_or_path("builtin:tiny")
    tokenizer = AutoTokenizer.from_pretrained(base)
    return build_lora_adapter(
        base, out_dir, tokenizer, random_b=True, r=8, alpha=8, target_modules=("q_proj", "v_proj")
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _post(url: str, body: dict[str, Any], key: str | None) -> tuple[float, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        payload = json.loads(response.read())
    return time.perf_counter() - started, payload


def measure(
    url: str, bodies: list[dict[str, Any]], concurrency: int, key: str | None
) -> tuple[list[float], float, list[dict]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: _post(url, b, key), bodies))
    wall = time.perf_counter() - started
    return [r[0] for r in results], wall, [r[1] for r in results]


def run_serve_benchmark(
    *,
    base: str = "builtin:tiny",
    tuned: str | None = None,
    requests: int = 64,
    concurrency: int = 4,
    max_new_tokens: int = 32,
    port: int = 8000,
    api_key_file: str | None = None,
) -> dict[str, Any]:
    from dpo_cluster.config import load_config
    from dpo_cluster.serving.app import read_api_key
    from dpo_cluster.serving.launch import start_serving, stop_serving

    workdir = Path(tempfile.mkdtemp(prefix="dpo-cluster-bench-serve-"))
    tuned = tuned or str(build_demo_adapter(workdir / "final"))
    overrides = [
        f"serve.base={base}",
        f"serve.tuned={tuned}",
        f"serve.port={port}",
        f"serve.arena_db={workdir / 'votes.sqlite'}",
        f"serve.max_new_tokens={max_new_tokens}",
        f"serve.default_max_new_tokens={max_new_tokens}",
    ]
    if api_key_file:
        overrides.append(f"serve.api_key_file={api_key_file}")
    config = load_config(None, overrides, serving=True)
    key = read_api_key(config.serve.api_key_env, config.serve.api_key_file)
    urls = start_serving(config)
    sampling = {"max_tokens": max_new_tokens, "temperature": 1.0, "seed": 0}
    single_bodies = [
        {"model": "tuned", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]} | sampling
        for i in range(requests)
    ]
    compare_bodies = [
        {"messages": b["messages"], "max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": 0}
        for b in single_bodies
    ]
    try:
        measure(urls.openai + "/chat/completions", single_bodies[:concurrency], concurrency, key)  # warm-up
        measure(urls.compare, compare_bodies[:concurrency], concurrency, key)
        single, single_wall, single_out = measure(
            urls.openai + "/chat/completions", single_bodies, concurrency, key
        )
        both, both_wall, both_out = measure(urls.compare, compare_bodies, concurrency, key)
    finally:
        stop_serving()

    single_tokens = statistics.mean(o["usage"]["completion_tokens"] for o in single_out)
    both_tokens = statistics.mean(
        o["base"]["usage"]["completion_tokens"] + o["tuned"]["usage"]["completion_tokens"] for o in both_out
    )
    rows = {
        "single (tuned)": _row(single, single_wall, single_tokens),
        "compare (base+tuned)": _row(both, both_wall, both_tokens),
    }
    result = {
        "requests": requests,
        "concurrency": concurrency,
        "max_new_tokens": max_new_tokens,
        "base": base,
        "tuned": tuned,
        "rows": rows,
        "ratio_p50": rows["compare (base+tuned)"]["p50_s"] / rows["single (tuned)"]["p50_s"],
        "ratio_p95": rows["compare (base+tuned)"]["p95_s"] / rows["single (tuned)"]["p95_s"],
    }
    print(format_table(result))
    return result


def _row(latencies: list[float], wall: float, tokens: float) -> dict[str, float]:
    return {
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "requests_per_s": len(latencies) / wall,
        "completion_tokens_per_request": tokens,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['requests']} requests, {result['concurrency']} concurrent, max_new_tokens {result['max_new_tokens']}",
        f"{'route':<22} {'p50 s':>8} {'p95 s':>8} {'req/s':>8} {'tokens/req':>11}",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"{name:<22} {row['p50_s']:>8.3f} {row['p95_s']:>8.3f} {row['requests_per_s']:>8.2f} "
            f"{row['completion_tokens_per_request']:>11.1f}"
        )
    lines.append(f"compare / single: p50 {result['ratio_p50']:.2f}x, p95 {result['ratio_p95']:.2f}x")
    return "\n".join(lines)
