"""The `evaluation` section: `dpo-cluster eval`'s models, prompts, sampling and judge.

Judge rule names are checked against `JUDGE_RULES`, not `dpo_cluster.evaluation.judges` itself,
so that loading a config needs no evaluation code; the tests keep the two equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpo_cluster.config.loader import ConfigError
from dpo_cluster.paths import looks_local

# The named rules `dpo_cluster.evaluation.judges.RULES` implements.
JUDGE_RULES: tuple[str, ...] = ("title_length", "plain_title")


@dataclass
class EvalConfig:
    """`dpo-cluster eval`: held-out reward accuracy of tuned vs base, and tuned-vs-base win rate."""

    # The tuned model: a training run's final/ (full model or LoRA adapter directory) or a hub id.
    # null = output_dir/final.
    tuned: str | None = None
    # The base model, which is also the DPO reference. null = model.name_or_path.
    base: str | None = None
    # Prompts for the win rate: a .jsonl or .json file of rows with a "prompt" (a string or a
    # message list; preference rows are fine, their chosen/rejected are ignored).
    # null = the prompts of the data's eval split (data.eval or data.eval_fraction).
    prompts: str | None = None
    # How many prompts (the first N, in file order; identical prompts count once). >= 1.
    num_prompts: int = 64
    # Sampling, the same for base and tuned: tokens per answer (>= 1), temperature (0 = greedy,
    # else > 0), nucleus top_p in (0, 1], and the seed (prompt i is sampled with seed + i).
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # Who decides which answer is better: rule (evaluation.rule or evaluation.pattern) |
    # reward_model (evaluation.reward_model scores both) | arena (the votes in evaluation.arena_db;
    # nothing is generated).
    judge: Literal["rule", "reward_model", "arena"] = "rule"
    # Judge rule: a named rule, title_length (30-75 characters on one line,
    # dpo_cluster.data.samples.is_good_title) or plain_title (the same, not wrapped in quotation
    # marks, is_plain_title) ...
    rule: str | None = None
    # ... or a regular expression (Python re, searched anywhere in the answer). Set one of the two.
    pattern: str | None = None
    # An answer passes when the pattern is found (true) or when it is not found (false).
    pattern_must_match: bool = True
    # Judge reward_model: a directory or hub id of an AutoModelForSequenceClassification with
    # num_labels 1 and its tokenizer.
    reward_model: str | None = None
    # Judge arena: the arena's SQLite file. null = the serve app's (serve.arena_db, else
    # output_dir/arena/votes.sqlite).
    arena_db: str | None = None
    # Prompts per generation batch (each gives two rows, base and tuned), and pairs per log-prob
    # batch. >= 1. Lower it for long sequences or large vocabularies.
    batch_size: int = 16
    # Held-out pairs scored for reward accuracy (the first N of the eval split). null = all.
    max_pairs: int | None = None
    # Engine for the win rate's answers, as serve.backend: auto (vllm where vLLM is installed and
    # serves the model, else hf) | hf | vllm. vllm takes every prompt of both models at once
    # (continuous batching); log-probs for reward accuracy always come from transformers. vllm
    # sizes its KV cache from serve.vllm_kv_cache_gb / serve.vllm_gpu_memory_utilization.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # Device for generation and log-probs: null (cuda when a GPU is visible, else cpu) | cpu |
    # cuda | cuda:N.
    device: str | None = None
    # Weights dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the JSON report goes. null = output_dir/eval_report.json.
    output: str | None = None

    def check(self) -> None:
        """Each field on its own, and pairs of fields that are both set. What a run additionally
        needs (a judge's own setting, a prompt source) is `check_ready`, since every command
        loads this section and only `eval` uses it."""
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"evaluation.max_pairs: must be >= 1 or null, got {self.max_pairs}")
        if self.temperature < 0:
            raise ConfigError(f"evaluation.temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"evaluation.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"evaluation.seed: must be in [0, 2**63), got {self.seed}")
        if self.rule is not None and self.rule not in JUDGE_RULES:
            raise ConfigError(f"evaluation.rule: unknown rule {self.rule!r}; valid: {', '.join(JUDGE_RULES)}")
        if self.rule is not None and self.pattern is not None:
            raise ConfigError("evaluation.pattern: set together with evaluation.rule; set one of the two")
        if self.pattern is not None:
            if not self.pattern:
                raise ConfigError("evaluation.pattern: must not be empty")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"evaluation.pattern: not a valid regular expression: {e}") from e
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"evaluation.device: null, cpu, cuda or cuda:N, got {self.device!r}")
        if self.prompts is not None and not Path(self.prompts).expanduser().is_file():
            raise ConfigError(f"evaluation.prompts: no such file: {self.prompts}")
        for name in ("reward_model", "tuned", "base"):
            value = getattr(self, name)
            # Spelled as a path (not a hub id): a missing one is a mistake to report now.
            if looks_local(value) and not Path(value).expanduser().exists():
                raise ConfigError(f"evaluation.{name}: no such file or directory: {value}")

    def check_ready(self, has_eval_split: bool) -> None:
        """What `dpo-cluster eval` needs beyond `check`: the judge's own setting, and prompts
        (a file, or an eval split to take them from). Raises ConfigError naming the key."""
        if self.judge == "rule" and self.rule is None and self.pattern is None:
            raise ConfigError(
                "evaluation.judge: rule needs evaluation.rule "
                f"({', '.join(JUDGE_RULES)}) or evaluation.pattern (a regular expression)"
            )
        if self.judge == "reward_model" and not self.reward_model:
            raise ConfigError(
                "evaluation.judge: reward_model needs evaluation.reward_model (a sequence-classification "
                "model directory or hub id)"
            )
        if self.judge != "arena" and self.prompts is None and not has_eval_split:
            raise ConfigError(
                "evaluation.prompts: required when the data has no eval split (set evaluation.prompts, "
                "data.eval or data.eval_fraction)"
            )
