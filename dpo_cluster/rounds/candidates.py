"""A round's candidates: `samples_per_prompt` answers to every prompt from the current policy.

Requests are built as the serve app builds them (its prompt rendering and limit), each with a seed
of its own (`RoundsConfig.candidate_seed`), and run on vLLM (every request handed to one engine at
once) or on the transformers backend in batches. A prompt the policy cannot take (over
serve.max_prompt_tokens) gets no candidates and is counted, never silently lost.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dpo_cluster.config import Config
from dpo_cluster.evaluation.judges import Prompt
from dpo_cluster.serving.generation import GenerationRequest, SamplingParams
from dpo_cluster.serving.prompts import PromptError, render_prompt_ids

POLICY = "policy"
HF_BATCH = 16  # requests per transformers batch


@dataclass(frozen=True)
class Candidate:
    """One sampled answer: which prompt, which sample, its seed, its text."""

    prompt_index: int
    sample: int
    seed: int
    text: str
    finish_reason: str

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def sample_candidates(
    config: Config,
    policy: str,
    prompts: list[Prompt],
    round_index: int,
    *,
    progress: bool = True,
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Every prompt's candidates from the model at `policy` (a directory or hub id): (candidates
    in (prompt, sample) order, skipped prompts as {"prompt_index", "reason"})."""
    from dpo_cluster.serving.generation.vllm_backend import choose_engine

    r, serve = config.rounds, config.serve
    engine = choose_engine(r.backend, [policy], [], on_gpu=_on_gpu(config))
    tokenizer = _tokenizer(policy, config)
    requests: list[tuple[int, int, GenerationRequest]] = []
    skipped: list[dict[str, Any]] = []
    for index, prompt in enumerate(prompts):
        try:
            ids = _render(tokenizer, prompt, serve.max_prompt_tokens)
        except PromptError as error:
            skipped.append({"prompt_index": index, "reason": str(error)})
            continue
        for sample in range(r.samples_per_prompt):
            params = SamplingParams(
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.candidate_seed(round_index, index, sample),
            )
            requests.append(
                (index, sample, GenerationRequest(model=POLICY, prompt_ids=tuple(ids), params=params))
            )
    run = _run_vllm if engine == "vllm" else _run_hf
    results = run(config, policy, [req for _, _, req in requests], progress=progress)
    candidates = [
        Candidate(index, sample, req.params.seed or 0, result.text, result.finish_reason)
        for (index, sample, req), result in zip(requests, results, strict=True)
    ]
    return candidates, skipped


def _render(tokenizer: Any, prompt: Prompt, max_prompt_tokens: int) -> list[int]:
    if isinstance(prompt, str):
        return render_prompt_ids(tokenizer, prompt=prompt, max_prompt_tokens=max_prompt_tokens)
    return render_prompt_ids(tokenizer, messages=prompt, max_prompt_tokens=max_prompt_tokens)


def _tokenizer(policy: str, config: Config) -> Any:
    from dpo_cluster.serving.generation.weights import load_tokenizer_of

    return load_tokenizer_of(POLICY, policy, None, config.model.trust_remote_code)


def _on_gpu(config: Config) -> bool:
    import torch

    return torch.cuda.is_available() and config.evaluation.device != "cpu"


def _run_hf(config: Config, policy: str, requests: list[GenerationRequest], *, progress: bool) -> list[Any]:
    from tqdm import tqdm

    from dpo_cluster.serving.generation import TransformersBackend

    ev = config.evaluation
    backend = TransformersBackend(
        policy,
        {POLICY: None},
        device=ev.device,
        dtype=ev.dtype,
        trust_remote_code=config.model.trust_remote_code,
    )
    results: list[Any] = []
    with _bar(len(requests), progress, tqdm) as bar:
        for start in range(0, len(requests), HF_BATCH):
            batch = requests[start : start + HF_BATCH]
            results += backend.generate(batch)
            bar.update(len(batch))
    return results


def _run_vllm(config: Config, policy: str, requests: list[GenerationRequest], *, progress: bool) -> list[Any]:
    from tqdm import tqdm

    from dpo_cluster.evaluation.vllm_answers import run_vllm_requests

    ev, s, r = config.evaluation, config.serve, config.rounds
    engine = {
        "dtype": ev.dtype,
        "max_model_len": s.max_prompt_tokens + r.max_new_tokens,
        "kv_cache_gb": s.vllm_kv_cache_gb,
        "gpu_memory_utilization": s.gpu_memory_utilization(),
    }
    with _bar(len(requests), progress, tqdm) as bar:
        return run_vllm_requests(policy, {POLICY: None}, requests, engine, bar.update)


def _bar(total: int, progress: bool, tqdm: Callable[..., Any]) -> Any:
    return tqdm(total=total, desc="sampling candidates", unit="answer", file=sys.stderr, disable=not progress)
