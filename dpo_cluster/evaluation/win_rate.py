"""Base and tuned answer the same prompts; a judge decides which answer is better.

Answers come from the serve app's own generation path (its prompt rendering, limit and sampling,
a per-prompt seed), so an evaluated answer is the answer the server would give.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpo_cluster.config import EvalConfig
from dpo_cluster.evaluation.judges import (
    BASE,
    TUNED,
    Prompt,
    RewardModelJudge,
    build_rule,
    summarize_passes,
    summarize_scores,
    verdict,
)
from dpo_cluster.evaluation.models import EvalModels
from dpo_cluster.serving.generation import GenerationRequest, SamplingParams
from dpo_cluster.serving.prompts import PromptError, render_prompt_ids

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class SideBySide:
    """One prompt and both models' answers to it."""

    index: int  # position in the prompt set (its seed is evaluation.seed + index)
    prompt: Prompt
    base: str
    tuned: str


def sampling_params(settings: EvalConfig, index: int) -> SamplingParams:
    """The sampling parameters of prompt `index`, the same for base and tuned."""
    return SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed + index,
    )


def build_request(
    models: EvalModels, name: str, prompt: Prompt, params: SamplingParams, max_prompt_tokens: int
) -> GenerationRequest:
    """The request the serve app would build for `prompt` to model `name`. Raises PromptError or
    ValueError when the model cannot take the prompt."""
    tokenizer = models.tokenizer(name)
    if isinstance(prompt, str):
        ids = render_prompt_ids(tokenizer, prompt=prompt, max_prompt_tokens=max_prompt_tokens)
    else:
        ids = render_prompt_ids(tokenizer, messages=prompt, max_prompt_tokens=max_prompt_tokens)
    request = GenerationRequest(model=name, prompt_ids=tuple(ids), params=params)
    models.backends[name].validate(request)
    return request


Requests = dict[str, GenerationRequest]  # "base" / "tuned" -> that model's request for one prompt


def build_side_by_side(
    models: EvalModels, prompts: Sequence[Prompt], settings: EvalConfig, *, max_prompt_tokens: int
) -> tuple[list[tuple[int, Prompt, Requests]], list[dict[str, Any]]]:
    """Both models' requests for every prompt both can take: ([(index, prompt, requests)],
    skipped). A prompt either model cannot take (over the prompt limit, or no room left in the
    context) is skipped for both, {"index", "prompt", "reason"}, so both sides are judged on the
    same prompts. Prompt i is sampled with seed evaluation.seed + i."""
    kept: list[tuple[int, Prompt, Requests]] = []
    skipped: list[dict[str, Any]] = []
    for index, prompt in enumerate(prompts):
        params = sampling_params(settings, index)
        try:
            requests = {
                name: build_request(models, name, prompt, params, max_prompt_tokens) for name in (BASE, TUNED)
            }
        except (PromptError, ValueError) as error:
            skipped.append({"index": index, "prompt": prompt, "reason": str(error)})
            continue
        kept.append((index, prompt, requests))
    return kept, skipped


def generate_side_by_side(
    models: EvalModels,
    prompts: Sequence[Prompt],
    settings: EvalConfig,
    *,
    max_prompt_tokens: int,
    progress: bool = True,
) -> tuple[list[SideBySide], list[dict[str, Any]]]:
    """Both models' answers to every prompt through the transformers backends,
    `settings.batch_size` prompts per batch: (answered in prompt order, skipped) as
    `build_side_by_side` says."""
    from tqdm import tqdm

    kept, skipped = build_side_by_side(models, prompts, settings, max_prompt_tokens=max_prompt_tokens)
    answered: list[SideBySide] = []
    shared = models.backends[BASE] is models.backends[TUNED]
    with tqdm(
        total=len(kept), desc="generating (base, tuned)", unit="prompt", file=sys.stderr, disable=not progress
    ) as bar:
        for start in range(0, len(kept), settings.batch_size):
            batch = kept[start : start + settings.batch_size]
            texts: dict[str, list[str]] = {}
            if shared:
                # Base and tuned rows in one mixed batch: one forward per step for both.
                rows = [r[name] for _, _, r in batch for name in (BASE, TUNED)]
                results = models.backends[TUNED].generate(rows)
                texts[BASE] = [res.text for res in results[0::2]]
                texts[TUNED] = [res.text for res in results[1::2]]
            else:
                for name in (BASE, TUNED):
                    results = models.backends[name].generate([r[name] for _, _, r in batch])
                    texts[name] = [res.text for res in results]
            for k, (index, prompt, _) in enumerate(batch):
                answered.append(SideBySide(index, prompt, texts[BASE][k], texts[TUNED][k]))
            bar.update(len(batch))
    return answered, skipped


def judge_by_rule(
    answers: Sequence[SideBySide], settings: EvalConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rule judge's summary (`summarize_passes`) and per-prompt verdicts, in answer order."""
    passes, description = build_rule(settings.rule, settings.pattern, settings.pattern_must_match)
    base_pass = [passes(a.base) for a in answers]
    tuned_pass = [passes(a.tuned) for a in answers]
    summary = {"name": "rule", **description, **summarize_passes(base_pass, tuned_pass)}
    verdicts = [
        {"base_pass": b, "tuned_pass": t, "winner": verdict(t and not b, b and not t)}
        for b, t in zip(base_pass, tuned_pass)
    ]
    return summary, verdicts


def judge_by_reward_model(
    answers: Sequence[SideBySide], settings: EvalConfig, *, trust_remote_code: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reward-model judge's summary (`summarize_scores`) and per-prompt scores and winners."""
    assert settings.reward_model is not None
    judge = RewardModelJudge(
        settings.reward_model,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        trust_remote_code=trust_remote_code,
    )
    prompts = [a.prompt for a in answers]
    # One call for both sides: an answer both models gave is scored once and ties exactly.
    scores = judge.score(prompts + prompts, [a.base for a in answers] + [a.tuned for a in answers])
    base_scores, tuned_scores = scores[: len(answers)], scores[len(answers) :]
    summary = {
        "name": "reward_model",
        "reward_model": settings.reward_model,
        **summarize_scores(base_scores, tuned_scores),
    }
    verdicts = [
        {"base_score": b, "tuned_score": t, "winner": verdict(t > b, b > t)}
        for b, t in zip(base_scores, tuned_scores)
    ]
    return summary, verdicts


def build_examples(
    answers: Sequence[SideBySide], verdicts: Sequence[dict[str, Any]], limit: int = MAX_EXAMPLES
) -> list[dict[str, Any]]:
    """The first `limit` prompts side by side: prompt, base and tuned answers, the judge's verdict."""
    return [
        {"prompt": a.prompt, BASE: a.base, TUNED: a.tuned, "verdict": v}
        for a, v in zip(answers[:limit], verdicts[:limit])
    ]
