"""The win rate's answers from vLLM: every prompt of both models handed to the engine at once.

The requests are the ones the transformers path builds (the serve app's rendering, limits and
per-prompt seeds), so only the engine differs. With a LoRA tuned model one engine serves base
and adapter side by side; a full tuned model gets an engine after the base's, so only one is
resident at a time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from dpo_cluster.evaluation.judges import BASE, TUNED, Prompt
from dpo_cluster.evaluation.win_rate import Requests, SideBySide
from dpo_cluster.serving.generation import GenerationRequest, GenerationResult


def generate_side_by_side_vllm(
    kept: Sequence[tuple[int, Prompt, Requests]],
    *,
    base: str,
    tuned: str,
    tuned_is_adapter: bool,
    engine: dict[str, Any],
    progress: bool = True,
) -> list[SideBySide]:
    """Answers to `kept` (from `build_side_by_side`), in its order. engine: VLLMBackend's
    keyword arguments (dtype, max_model_len, kv_cache_gb, gpu_memory_utilization)."""
    from tqdm import tqdm

    if tuned_is_adapter:
        plan = [(base, {BASE: None, TUNED: tuned}, [r[name] for _, _, r in kept for name in (BASE, TUNED)])]
    else:
        plan = [
            (base, {BASE: None}, [r[BASE] for _, _, r in kept]),
            (tuned, {TUNED: None}, [r[TUNED] for _, _, r in kept]),
        ]
    texts: dict[str, list[str]] = {BASE: [], TUNED: []}
    with tqdm(
        total=2 * len(kept),
        desc="generating (base, tuned) on vLLM",
        unit="answer",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for weights, names, requests in plan:
            for request, result in zip(
                requests, run_vllm_requests(weights, names, requests, engine, bar.update)
            ):
                texts[request.model].append(result.text)
    return [
        SideBySide(index, prompt, texts[BASE][k], texts[TUNED][k])
        for k, (index, prompt, _) in enumerate(kept)
    ]


def run_vllm_requests(
    weights: str,
    names: dict[str, str | None],
    requests: list[GenerationRequest],
    engine: dict[str, Any],
    on_done: Any,
) -> list[GenerationResult]:
    """Start an engine, run every request concurrently, stop the engine; results in order."""
    from dpo_cluster.serving.generation.vllm_backend import VLLMBackend

    backend = VLLMBackend(weights, names, **engine)

    async def one(request: GenerationRequest) -> GenerationResult:
        result = await backend.generate(request)
        on_done(1)
        return result

    async def every() -> list[GenerationResult]:
        return list(await asyncio.gather(*(one(r) for r in requests)))

    try:
        return asyncio.run(every())
    finally:
        backend.shutdown()
