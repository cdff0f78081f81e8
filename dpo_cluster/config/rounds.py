"""The `rounds` section: `dpo-cluster rounds`, on-policy preference rounds (sample, judge, pair,
train, evaluate, again). Each round's training reuses the train/lora/reference/deepspeed/scaling
sections and its evaluation the `evaluation` section; only what is new to the loop lives here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpo_cluster.config.loader import ConfigError

# {prompt}, {answer_a} and {answer_b} are filled in; the judge's reply must name A or B.
DEFAULT_JUDGE_TEMPLATE = (
    "Which answer to the request below is better? Reply with the single letter A or B.\n\n"
    "Request: {prompt}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}\n\nBetter answer:"
)
JUDGE_TEMPLATE_FIELDS = ("{prompt}", "{answer_a}", "{answer_b}")


@dataclass
class RoundsConfig:
    """On-policy rounds: the current policy answers, a judge picks, DPO trains the next policy."""

    # Rounds to run, >= 1. An interrupted run resumes at its first incomplete round.
    num_rounds: int = 2
    # The prompts each round samples on: a .jsonl or .json file of rows with a "prompt" (a string
    # or a message list; preference rows are fine). null = the prompts of the data's train split.
    prompts: str | None = None
    # How many of them (the first N distinct, in source order), >= 1.
    num_prompts: int = 64
    # Answers sampled per prompt from the current policy, >= 2.
    samples_per_prompt: int = 4
    # Sampling of the candidates: tokens per answer (>= 1), temperature (> 0: the candidates of a
    # prompt must differ), nucleus top_p in (0, 1], and the seed (round k, prompt i, sample j is
    # drawn with seed + (k * num_prompts + i) * samples_per_prompt + j).
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int = 0
    # Engine that samples, as serve.backend: auto (vllm where installed and it serves the model,
    # else hf) | hf (transformers) | vllm.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # Who picks between two candidates:
    #   rule: evaluation.rule or evaluation.pattern; a passing answer beats a failing one.
    #   reward_model: evaluation.reward_model scores each candidate; the higher score wins.
    #   llm_judge: a model behind an OpenAI-compatible endpoint (judge_url) is asked both orders;
    #     two answers that disagree, or a reply that names neither A nor B, count as a tie.
    #   arena: each pair is posted to the serve app at arena_url as a blind battle; people vote
    #     until arena_deadline_s, and a pair with no vote by then is a tie.
    judge: Literal["rule", "reward_model", "llm_judge", "arena"] = "rule"
    # Which judged pairs train the next policy: all (every decisive pair of a prompt's
    # candidates) | best_vs_worst (per prompt, the most-preferred candidate against the least).
    pairing: Literal["all", "best_vs_worst"] = "all"
    # The DPO reference of round k: base (the starting model, every round) | previous (the policy
    # round k starts from, i.e. round k-1's).
    reference: Literal["base", "previous"] = "previous"
    # llm_judge: the endpoint's base URL (…/v1), the model name it serves, and the prompt (a
    # template with {prompt}, {answer_a}, {answer_b}; null = a built-in one asking for A or B).
    judge_url: str | None = None
    judge_model: str | None = None
    judge_template: str | None = None
    # llm_judge: tokens of the judge's reply (>= 1) and requests in flight at once (>= 1).
    judge_max_tokens: int = 8
    judge_concurrency: int = 4
    # arena: the serve app's base URL (http://host:8000), and seconds to wait for votes (> 0).
    arena_url: str | None = None
    arena_deadline_s: float = 3600.0
    # llm_judge / arena: the environment variable holding the API key sent as a Bearer token
    # (the serve app's serve.api_key_env, or the judge service's). null = none sent.
    api_key_env: str | None = None
    # Seconds one HTTP request to the judge or the arena may take, > 0.
    request_timeout_s: float = 120.0

    def check(self) -> None:
        for name in ("num_rounds", "num_prompts", "max_new_tokens", "judge_max_tokens", "judge_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rounds.{name}: must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"rounds.samples_per_prompt: must be >= 2 (pairs need two candidates), got {self.samples_per_prompt}"
            )
        if self.temperature <= 0:
            raise ConfigError(
                f"rounds.temperature: must be > 0 (greedy answers to one prompt are all the same), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rounds.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**62:
            raise ConfigError(f"rounds.seed: must be in [0, 2**62), got {self.seed}")
        for name in ("arena_deadline_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"rounds.{name}: must be > 0, got {getattr(self, name)}")
        if self.prompts is not None and not Path(self.prompts).expanduser().is_file():
            raise ConfigError(f"rounds.prompts: no such file: {self.prompts}")
        self._check_judge()

    def _check_judge(self) -> None:
        if self.judge == "llm_judge":
            for name in ("judge_url", "judge_model"):
                if not getattr(self, name):
                    raise ConfigError(f"rounds.{name}: required with rounds.judge: llm_judge")
            _check_url("rounds.judge_url", self.judge_url)
            if self.judge_template is not None:
                missing = [f for f in JUDGE_TEMPLATE_FIELDS if f not in self.judge_template]
                if missing:
                    raise ConfigError(f"rounds.judge_template: must contain {', '.join(missing)}")
        if self.judge == "arena":
            if not self.arena_url:
                raise ConfigError("rounds.arena_url: required with rounds.judge: arena (the serve app's URL)")
            _check_url("rounds.arena_url", self.arena_url)

    def judge_prompt_template(self) -> str:
        return self.judge_template or DEFAULT_JUDGE_TEMPLATE

    def candidate_seed(self, round_index: int, prompt_index: int, sample: int) -> int:
        """The sampling seed of round `round_index` (1-based), prompt `prompt_index`, sample `sample`."""
        return (
            self.seed + ((round_index * self.num_prompts) + prompt_index) * self.samples_per_prompt + sample
        )


def _check_url(key: str, value: str | None) -> None:
    if value is None or not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
