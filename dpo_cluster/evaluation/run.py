"""`run_evaluation(config)`: the whole of `dpo-cluster eval`, callable from other commands too.

    config ──▶ prepare (eval split, when the data has one) ──▶ base + tuned loaded once
           ──▶ reward accuracy on the eval pairs (tuned policy vs base reference)
           ──▶ both models answer the prompts ──▶ judge (rule | reward_model), or arena votes
           ──▶ one JSON report (evaluation.output, else output_dir/eval_report.json)

Mistakes the user can fix (a missing model directory, a judge without its setting, a prompt file
without prompts) raise ConfigError or DataError before the expensive steps where possible.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.config import Config, ConfigError
from dpo_cluster.evaluation.report import REPORT_FILE, write_report

if TYPE_CHECKING:
    from dpo_cluster.evaluation.models import EvalModels

# Placeholders that look like paths: not hub ids, so a missing directory is a plain mistake.
_PATH_PREFIXES = ("/", "./", "../", "~")


def resolve_models(config: Config, *, must_exist: bool = True) -> tuple[str, str]:
    """(base, tuned) names: evaluation.base or model.name_or_path, evaluation.tuned or
    output_dir/final. Raises ConfigError, when must_exist, if the tuned model is a directory that
    does not exist."""
    ev = config.evaluation
    base = ev.base or config.model.name_or_path
    tuned = ev.tuned or str(Path(config.output_dir) / "final")
    spelled_as_path = ev.tuned is None or tuned.startswith(_PATH_PREFIXES)
    if must_exist and spelled_as_path and not Path(tuned).expanduser().exists():
        raise ConfigError(
            f"evaluation.tuned: no such model directory: {tuned} (train first, or set evaluation.tuned / --tuned)"
        )
    return base, tuned


def run_evaluation(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate the tuned model against its base as `config.evaluation` says; write and return the
    report: {"base", "tuned", "models", "reward_accuracy", "judge", "examples", "settings",
    "seconds", "output"}. `progress` shows tqdm bars on stderr while scoring and generating."""
    from dpo_cluster.data.pipeline import prepare
    from dpo_cluster.evaluation.judges import summarize_arena
    from dpo_cluster.evaluation.models import load_eval_models
    from dpo_cluster.evaluation.prompt_sets import eval_split_prompts, load_prompt_file
    from dpo_cluster.evaluation.win_rate import (
        build_examples,
        generate_side_by_side,
        judge_by_reward_model,
        judge_by_rule,
    )

    started = time.perf_counter()
    ev = config.evaluation
    has_eval_split = config.data.eval is not None or config.data.eval_fraction > 0
    ev.check_ready(has_eval_split)
    # Arena votes alone (no eval split to score) need no model at all.
    needs_models = has_eval_split or ev.judge != "arena"
    base, tuned = resolve_models(config, must_exist=needs_models)
    arena_db = ev.arena_db or config.arena_db()
    if ev.judge == "arena" and not Path(arena_db).expanduser().is_file():
        raise ConfigError(
            f"evaluation.arena_db: no arena database at {arena_db} (serve the models and vote first)"
        )
    output = Path(ev.output) if ev.output else Path(config.output_dir) / REPORT_FILE

    prepared = prepare(config) if has_eval_split else None
    models: EvalModels | None = None

    def loaded() -> EvalModels:
        nonlocal models
        if models is None:
            try:
                models = load_eval_models(
                    base,
                    tuned,
                    device=ev.device,
                    dtype=ev.dtype,
                    base_revision=config.model.revision if base == config.model.name_or_path else None,
                    trust_remote_code=config.model.trust_remote_code,
                )
            except ValueError as error:
                raise ConfigError(f"evaluation (base {base!r}, tuned {tuned!r}): {error}") from error
        return models

    # 1. Held-out reward accuracy.
    split_dir = prepared.split_dir("eval") if prepared is not None else None
    if prepared is None:
        reward_accuracy: dict[str, Any] = {
            "skipped": "the data has no eval split (set data.eval, or data.eval_fraction > 0)"
        }
    elif split_dir is None:
        reward_accuracy = {
            "skipped": f"the eval split is empty: no pairs were kept for it (see {prepared.output_dir}/data_report.json)"
        }
    else:
        reward_accuracy = _reward_accuracy(loaded(), split_dir, config, progress=progress)

    # 2. Win rate by the judge.
    examples: list[dict[str, Any]]
    models_info: dict[str, Any] | None = None
    if ev.judge == "arena":
        try:
            judged, examples = summarize_arena(arena_db)
        except ValueError as error:
            raise ConfigError(f"evaluation.arena_db: {error}") from error
        judged = {"name": "arena", **judged}
    else:
        if ev.prompts is not None:
            prompts = load_prompt_file(ev.prompts, ev.num_prompts)
            source = ev.prompts
        else:
            assert prepared is not None  # check_ready: no prompt file means an eval split
            prompts = eval_split_prompts(config, prepared, ev.num_prompts)
            source = "the eval split"
        answers, skipped = generate_side_by_side(
            loaded(), prompts, ev, max_prompt_tokens=config.serve.max_prompt_tokens, progress=progress
        )
        if ev.judge == "rule":
            summary, verdicts = judge_by_rule(answers, ev)
        else:
            # The answers are in: free the generation models before the reward model loads.
            models_info = models.describe() if models is not None else None
            models = None
            try:
                summary, verdicts = judge_by_reward_model(
                    answers, ev, trust_remote_code=config.model.trust_remote_code
                )
            except ValueError as error:
                raise ConfigError(f"evaluation.reward_model: {error}") from error
        judged = {
            **summary,
            "prompt_source": source,
            "sampling": {
                "max_new_tokens": ev.max_new_tokens,
                "temperature": ev.temperature,
                "top_p": ev.top_p,
                "seed": ev.seed,
                "per_prompt_seed": "seed + prompt index",
            },
            "skipped_prompts": skipped,
        }
        examples = build_examples(answers, verdicts)

    report: dict[str, Any] = {
        "base": base,
        "tuned": tuned,
        "models": models.describe() if models is not None else models_info,
        "reward_accuracy": reward_accuracy,
        "judge": judged,
        "examples": examples,
        "settings": dataclasses.asdict(ev),
        "seconds": round(time.perf_counter() - started, 3),
        "output": str(output),
    }
    write_report(report, output)
    return report


def _reward_accuracy(
    models: EvalModels, split_dir: Path, config: Config, *, progress: bool
) -> dict[str, Any]:
    """The reward-accuracy section on the prepared eval pairs in `split_dir`."""
    from tqdm import tqdm

    from dpo_cluster.evaluation.reward_accuracy import compute_reward_accuracy, read_eval_pairs

    ev = config.evaluation
    pairs = read_eval_pairs(split_dir, ev.max_pairs)
    # The pairs were tokenized with the config's tokenizer; any in-vocabulary id pads, since
    # padding is masked out of attention and of the scored completion tokens.
    tokenizer = models.tokenizer("base")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(
        total=len(pairs["prompt_ids"]),
        desc="scoring eval pairs",
        unit="pair",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        section = compute_reward_accuracy(
            models.policy_forward(),
            models.reference_forward(),
            pairs,
            beta=config.train.beta,
            pad_token_id=int(pad) if pad is not None else 0,
            batch_size=ev.batch_size,
            device=models.device,
            progress=bar.update,
        )
    return {"split": "eval", **section}
