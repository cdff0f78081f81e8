"""`VLLMBackend` on its own, without Ray: a real vLLM engine (the CPU build) over SmolLM2 with a
LoRA adapter. What the HTTP tests cannot reach cheaply: deadlines, the engine's refusals and
the transformers backend's messages for them, streaming deltas against the whole text, and the
LoRA slot rule that keeps base rows of a mixed batch bare."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.serving.generation import GenerationRequest, SamplingParams, StreamDelta
from dpo_cluster.serving.generation.vllm_backend import VLLM_LORA_RANKS, VLLMBackend, vllm_lora_rank
from dpo_cluster.tiny import build_lora_adapter
from tests.serve_helpers import build_smollm2_adapter

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def backend(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMBackend]:
    final = build_smollm2_adapter(smollm2_dir, tmp_path_factory.mktemp("vllm_backend") / "final")
    engine = VLLMBackend(
        str(smollm2_dir), {"base": None, "tuned": str(final)}, max_model_len=96, kv_cache_gb=1.0
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompt(backend: VLLMBackend, smollm2_dir: Path) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    from dpo_cluster.serving.prompts import render_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    return tuple(render_prompt_ids(tokenizer, messages=messages, max_prompt_tokens=64))


# The engine's output handler lives on the event loop of its first request: every call of this
# module runs on that one loop, as a serve replica's calls do.
LOOP = asyncio.new_event_loop()


def run(coroutine: Any) -> Any:
    return LOOP.run_until_complete(coroutine)


async def collect(backend: VLLMBackend, request: GenerationRequest) -> list[StreamDelta]:
    return [delta async for delta in backend.stream(request)]


def test_base_rows_of_a_mixed_batch_get_the_bare_weights(
    backend: VLLMBackend, prompt: tuple[int, ...]
) -> None:
    base = GenerationRequest("base", prompt, GREEDY)
    tuned = GenerationRequest("tuned", prompt, GREEDY)
    alone = run(backend.generate(base))
    together = run(_gather(backend, [base, tuned, base]))
    assert together[0] == together[2] == alone
    assert together[1].text != alone.text  # the adapter is on for its rows only


def test_a_burst_of_seeded_requests_over_one_steps_token_budget(
    backend: VLLMBackend, prompt: tuple[int, ...]
) -> None:
    """More prompt tokens at once than one engine step schedules: with chunked prefill a split
    prompt's sampled token is discarded and its seeded generator rewound, which a CPU generator
    refuses (the engine died). Each seeded answer equals the same request run alone."""
    budget = backend.engine.vllm_config.scheduler_config.max_num_batched_tokens
    count = 4 * budget // len(prompt)  # arriving over a few steps, some step is over its budget
    requests = [
        GenerationRequest("base", prompt, SamplingParams(max_new_tokens=2, temperature=1.0, seed=i))
        for i in range(count)
    ]
    burst = run(_gather(backend, requests))
    assert len(burst) == count and all(r.completion_tokens >= 1 for r in burst)
    assert run(backend.generate(requests[-1])) == burst[-1]


async def _gather(backend: VLLMBackend, requests: list[GenerationRequest]) -> list[Any]:
    return list(await asyncio.gather(*(backend.generate(r) for r in requests)))


def test_stream_deltas_concatenate_to_the_whole_text(backend: VLLMBackend, prompt: tuple[int, ...]) -> None:
    request = GenerationRequest("tuned", prompt, GREEDY)
    whole = run(backend.generate(request))
    deltas = run(collect(backend, request))
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == (
        whole.finish_reason,
        whole.completion_tokens,
    )
    assert whole.prompt_tokens == len(prompt)


def test_a_passed_deadline_ends_the_request_as_a_timeout(
    backend: VLLMBackend, prompt: tuple[int, ...]
) -> None:
    long = SamplingParams(max_new_tokens=60, temperature=0)
    late = GenerationRequest("base", prompt, long, deadline=time.time() - 1)
    assert run(backend.generate(late)).finish_reason == "timeout"
    assert run(collect(backend, late))[-1].finish_reason == "timeout"
    # The engine is still serving afterwards.
    assert run(backend.generate(GenerationRequest("base", prompt, GREEDY))).finish_reason in (
        "stop",
        "length",
    )


def test_the_context_bounds_the_completion(backend: VLLMBackend, prompt: tuple[int, ...]) -> None:
    request = GenerationRequest("base", prompt, SamplingParams(max_new_tokens=200, temperature=0))
    result = run(backend.generate(request))
    assert result.prompt_tokens + result.completion_tokens <= backend.max_context
    assert result.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "model,ids,message",
    [
        ("other", (1, 2), "unknown model 'other'; this backend serves base, tuned"),
        ("base", (), "prompt_ids must not be empty"),
        ("base", (1, 49_152), "prompt_ids must be token ids in [0, 49152)"),
        (
            "base",
            tuple([1] * 96),
            "the prompt has 96 tokens and the model's context is 96: no room to generate",
        ),
    ],
)
def test_refusals_name_the_problem_before_any_compute(
    backend: VLLMBackend, model: str, ids: tuple[int, ...], message: str
) -> None:
    request = GenerationRequest(model, ids, GREEDY)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        backend.validate(request)
    with pytest.raises(ValueError):
        run(backend.generate(request))


def test_lora_rank_is_rounded_up_to_one_vllm_takes(tmp_path: Path, base_dir: Path) -> None:
    ranks = {}
    for r in (4, 8, 24):
        ranks[r] = build_lora_adapter(str(base_dir), tmp_path / f"r{r}", None, random_b=False, r=r, alpha=r)
    assert vllm_lora_rank([str(ranks[4])]) == 8
    assert vllm_lora_rank([str(ranks[8])]) == 8
    assert vllm_lora_rank([str(ranks[4]), str(ranks[24])]) == 32
    assert 32 in VLLM_LORA_RANKS
