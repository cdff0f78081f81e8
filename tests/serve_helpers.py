"""Builders and HTTP helpers shared by the serving tests: a tiny base model, a LoRA adapter over
it laid out like a training run's final/, a full tuned copy, and a small JSON client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.tiny import build_lora_adapter

API_KEY = "test-key-0123456789"


def build_lora_final(out_dir: Path, *, seed: int = 1) -> Path:
    """A peft LoRA adapter over "builtin:tiny" with non-zero weights (so tuned != base), saved
    with its tokenizer, as `dpo-cluster train` saves a LoRA run's final/."""
    from transformers import AutoTokenizer

    base = resolve_name_or_path("builtin:tiny")
    tokenizer = AutoTokenizer.from_pretrained(base)
    # B from N(0, 0.5): large enough to change greedy choices.
    return build_lora_adapter(
        base,
        out_dir,
        tokenizer,
        random_b=True,
        seed=seed,
        r=8,
        alpha=32,
        target_modules=("q_proj", "v_proj"),
        b_std=0.5,
    )


def build_smollm2_adapter(base: Path, out_dir: Path) -> Path:
    """A LoRA adapter over SmolLM2 with small random B (tuned answers differ, stay fluent), saved
    with its tokenizer as a training run's final/ is: the one `bench serve` builds."""
    from dpo_cluster.bench.serve import build_demo_adapter

    return build_demo_adapter(out_dir, str(base))


def mixed_burst(
    client: Client,
    valid: list[tuple[str, Any]],
    invalid: list[tuple[str, Any]],
    count: int,
    *,
    threads: int = 16,
) -> list[int]:
    """The status codes of `count` requests, each drawn (seeded) from `valid` or `invalid` with
    even odds, (path, body) pairs with bytes bodies sent raw, `threads` at a time."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    mixed = [rng.choice(valid) if rng.random() < 0.5 else rng.choice(invalid) for _ in range(count)]

    def send(item: tuple[str, Any]) -> int:
        path, body = item
        raw = body if isinstance(body, bytes) else None
        return client.post(path, None if raw else body, raw=raw).status_code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, mixed))


class Client:
    """requests against one server, with the API key by default."""

    def __init__(self, base_url: str, key: str | None = API_KEY) -> None:
        self.base_url = base_url
        self.key = key

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, *, key: str | None = "default", **kwargs: Any) -> requests.Response:
        key = self.key if key == "default" else key
        return requests.get(self.base_url + path, headers=self.headers(key), timeout=120, **kwargs)

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        key: str | None = "default",
        raw: bytes | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        key = self.key if key == "default" else key
        headers = self.headers(key) | {"Content-Type": "application/json"}
        data = raw if raw is not None else json.dumps(body).encode()
        return requests.post(self.base_url + path, data=data, headers=headers, timeout=120, **kwargs)


def sse_events(response: requests.Response) -> list[Any]:
    """The JSON payloads of a server-sent-events body, ending with the literal "[DONE]"."""
    events: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
