"""`run_evaluation(config)`: the whole of `dpo-cluster eval`, callable from other commands too.

It prepares the eval split (when the data has one), loads base and tuned once, scores held-out
reward accuracy, has both models answer the prompts for a judge (or reads the arena's votes) and
writes one JSON report. Mistakes the user can fix (a missing model directory, a judge without its
setting) raise ConfigError or DataError, before the expensive steps where possible.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.config import Config, ConfigError
from dpo_cluster.evaluation.report import REPORT_FILE, write_report
from dpo_cluster.paths import looks_local

if TYPE_CHECKING:
    from dpo_cluster.data.pipeline import PreparedData
    from dpo_cluster.evaluation.models import EvalModels


def resolve_models(config: Config, *, must_exist: bool = True) -> tuple[str, str]:
    """(base, tuned) names: evaluation.base or model.name_or_path, evaluation.tuned or
    output_dir/final. Raises ConfigError, when must_exist, if the tuned model is a directory that
    does not exist."""
    ev = config.evaluation
    base = ev.base or config.model.name_or_path
    tuned = ev.tuned or str(Path(config.output_dir) / "final")
    spelled_as_path = ev.tuned is None or looks_local(tuned)
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

    started = time.perf_counter()
    ev = config.evaluation
    has_eval_split = config.data.eval is not None or config.data.eval_fraction > 0
    ev.check_ready(has_eval_split)
    # Arena votes alone (no eval split to score) need no model at all.
    base, tuned = resolve_models(config, must_exist=has_eval_split or ev.judge != "arena")
    arena_db = ev.arena_db or config.arena_db()
    if ev.judge == "arena" and not Path(arena_db).expanduser().is_file():
        raise ConfigError(
            f"evaluation.arena_db: no arena database at {arena_db} (serve the models and vote first)"
        )
    output = Path(ev.output) if ev.output else Path(config.output_dir) / REPORT_FILE

    prepared = prepare(config) if has_eval_split else None
    models = _LazyModels(config, base, tuned)
    reward_accuracy = _reward_accuracy_section(prepared, models, config, progress=progress)
    if ev.judge == "arena":
        judged, examples = _arena_section(arena_db)
    else:
        judged, examples = _generated_section(config, prepared, models, progress=progress)
    report: dict[str, Any] = {
        "base": base,
        "tuned": tuned,
        "models": models.describe(),
        "reward_accuracy": reward_accuracy,
        "judge": judged,
        "examples": examples,
        "settings": dataclasses.asdict(ev),
        "seconds": round(time.perf_counter() - started, 3),
        "output": str(output),
    }
    write_report(report, output)
    return report


class _LazyModels:
    """Base and tuned, loaded on first use and then kept (scoring and generation share them), and
    released before a reward model loads; `describe()` still names what was loaded."""

    def __init__(self, config: Config, base: str, tuned: str) -> None:
        self.config, self.base, self.tuned = config, base, tuned
        self._models: EvalModels | None = None
        self._released_info: dict[str, Any] | None = None

    def get(self) -> EvalModels:
        """The loaded models; ConfigError naming both when either cannot be loaded."""
        from dpo_cluster.evaluation.models import load_eval_models

        if self._models is None:
            config, ev = self.config, self.config.evaluation
            try:
                self._models = load_eval_models(
                    self.base,
                    self.tuned,
                    device=ev.device,
                    dtype=ev.dtype,
                    base_revision=config.model.revision if self.base == config.model.name_or_path else None,
                    trust_remote_code=config.model.trust_remote_code,
                )
            except ValueError as error:
                raise ConfigError(
                    f"evaluation (base {self.base!r}, tuned {self.tuned!r}): {error}"
                ) from error
        return self._models

    def release(self) -> None:
        if self._models is not None:
            self._released_info = self._models.describe()
            self._models = None

    def describe(self) -> dict[str, Any] | None:
        """What `EvalModels.describe` says of the models, None when none were loaded."""
        return self._models.describe() if self._models is not None else self._released_info


def _reward_accuracy_section(
    prepared: PreparedData | None, models: _LazyModels, config: Config, *, progress: bool
) -> dict[str, Any]:
    """Held-out reward accuracy on the eval split, or why it was skipped."""
    if prepared is None:
        return {"skipped": "the data has no eval split (set data.eval, or data.eval_fraction > 0)"}
    split_dir = prepared.split_dir("eval")
    if split_dir is None:
        return {
            "skipped": f"the eval split is empty: no pairs were kept for it (see {prepared.output_dir}/data_report.json)"
        }
    return _reward_accuracy(models.get(), split_dir, config, progress=progress)


def _arena_section(arena_db: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The win rate people gave in the arena: (judge section, examples)."""
    from dpo_cluster.evaluation.judges import summarize_arena

    try:
        judged, examples = summarize_arena(arena_db)
    except ValueError as error:
        raise ConfigError(f"evaluation.arena_db: {error}") from error
    return {"name": "arena", **judged}, examples


def _generated_section(
    config: Config, prepared: PreparedData | None, models: _LazyModels, *, progress: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both models answer the prompts and the rule or reward-model judge decides: (judge section,
    examples)."""
    from dpo_cluster.evaluation.prompt_sets import eval_split_prompts, load_prompt_file
    from dpo_cluster.evaluation.win_rate import (
        build_examples,
        generate_side_by_side,
        judge_by_reward_model,
        judge_by_rule,
    )

    ev = config.evaluation
    if ev.prompts is not None:
        prompts, source = load_prompt_file(ev.prompts, ev.num_prompts), ev.prompts
    else:
        assert prepared is not None  # check_ready: no prompt file means an eval split
        prompts, source = eval_split_prompts(config, prepared, ev.num_prompts), "the eval split"
    if _generation_engine(config, models) == "vllm":
        answers, skipped = _vllm_answers(config, models, prompts, progress=progress)
    else:
        answers, skipped = generate_side_by_side(
            models.get(), prompts, ev, max_prompt_tokens=config.serve.max_prompt_tokens, progress=progress
        )
    if ev.judge == "rule":
        summary, verdicts = judge_by_rule(answers, ev)
    else:
        models.release()  # the answers are in: free the generation models before the reward model
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
    return judged, build_examples(answers, verdicts)


def _generation_engine(config: Config, models: _LazyModels) -> str:
    """ "hf" or "vllm" for evaluation.backend (see `choose_engine`), on this process's device."""
    import torch

    from dpo_cluster.serving.generation import is_adapter_dir
    from dpo_cluster.serving.generation.vllm_backend import choose_engine

    ev = config.evaluation
    adapter = is_adapter_dir(models.tuned)
    on_gpu = torch.cuda.is_available() and ev.device != "cpu"
    try:
        return choose_engine(
            ev.backend,
            [models.base] if adapter else [models.base, models.tuned],
            [models.tuned] * adapter,
            on_gpu=on_gpu,
        )
    except ValueError as error:
        raise ConfigError(f"evaluation.backend: {error}") from error


def _vllm_answers(
    config: Config, models: _LazyModels, prompts: list[Any], *, progress: bool
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The requests the transformers path would run, answered by vLLM; the transformers models
    are released first, so the engine has their memory."""
    from dpo_cluster.evaluation.vllm_answers import generate_side_by_side_vllm
    from dpo_cluster.evaluation.win_rate import build_side_by_side

    ev, s = config.evaluation, config.serve
    loaded = models.get()
    kept, skipped = build_side_by_side(loaded, prompts, ev, max_prompt_tokens=s.max_prompt_tokens)
    base, tuned, tuned_is_adapter = loaded.base, loaded.tuned, loaded.tuned_is_adapter
    del loaded
    models.release()
    engine = {
        "dtype": ev.dtype,
        "max_model_len": s.max_prompt_tokens + ev.max_new_tokens,
        "kv_cache_gb": s.vllm_kv_cache_gb,
        "gpu_memory_utilization": s.gpu_memory_utilization(),
    }
    answers = generate_side_by_side_vllm(
        kept,
        base=base,
        tuned=tuned,
        tuned_is_adapter=tuned_is_adapter,
        engine=engine,
        progress=progress,
    )
    return answers, skipped


def _reward_accuracy(
    models: EvalModels, split_dir: Path, config: Config, *, progress: bool
) -> dict[str, Any]:
    """The reward-accuracy section on the prepared eval pairs in `split_dir`."""
    from tqdm import tqdm

    from dpo_cluster.evaluation.reward_accuracy import compute_reward_accuracy, read_eval_pairs

    ev = config.evaluation
    pairs = read_eval_pairs(split_dir, ev.max_pairs)
    if not pairs["row_id"]:
        return {"skipped": "the eval split holds unpaired rows (prompt, completion, label), no pairs to rank"}
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
            models.policy_logps(config.train.logps_chunk_size),
            models.reference_logps(config.train.logps_chunk_size),
            pairs,
            beta=config.train.beta,
            pad_token_id=int(pad) if pad is not None else 0,
            batch_size=ev.batch_size,
            device=models.device,
            progress=bar.update,
        )
    return {"split": "eval", **section}
