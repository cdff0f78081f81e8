"""`run_rounds(config)`: the whole of `dpo-cluster rounds`. Each round k:

  1. the current policy (round 1: the base) samples rounds.samples_per_prompt answers per prompt
     -> round-k/candidates.jsonl
  2. the judge compares every two kept candidates of a prompt -> round-k/comparisons.jsonl
  3. pairs by rounds.pairing, every candidate, prompt and comparison accounted
     -> round-k/pairs.jsonl, round-k/report.json
  4. DPO trains the next policy on them, as `train` does -> round-k/run/ (final/ is the policy)
  5. the new policy is evaluated against the base and the previous policy on held-out prompts
     -> round-k/eval_vs_base.json, round-k/eval_vs_previous.json
then round-k/round.json marks the round done. Each step's file is written whole (temporary name,
then rename) and reused when present, so an interrupted run resumes at its first incomplete round
and, inside it, at the first step not done. The end: rounds_summary.json, rounds_win_rate.png and
rounds_serve.yaml (the base and every round side by side in the arena).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config, ConfigError
from dpo_cluster.data.records import DataError
from dpo_cluster.evaluation.judges import Prompt
from dpo_cluster.rounds.candidates import Candidate
from dpo_cluster.rounds.comparisons import Comparison

ROUND_FILE = "round.json"
PROMPTS_FILE = "prompts.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"


def run_rounds(
    config: Config, *, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) every round; returns the summary written to rounds_summary.json."""
    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.rounds.summary import write_summary

    config = config.with_absolute_paths()
    check_ready(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = str(resolve_name_or_path(config.model.name_or_path))
    prompts = _cached_prompts(out / PROMPTS_FILE, lambda: round_prompts(config))
    eval_file = held_out_prompts_file(config, out)
    records: list[dict[str, Any]] = []
    for k in range(1, config.rounds.num_rounds + 1):
        round_dir = out / f"round-{k}"
        done = round_dir / ROUND_FILE
        if done.is_file():
            log(f"round {k}: done earlier, reusing {round_dir}")
            records.append(json.loads(done.read_text()))
            continue
        previous = records[-1]["policy"] if records else base
        record = run_round(
            config, k, round_dir, prompts, base, previous, eval_file, progress=progress, log=log
        )
        write_json(done, record)
        records.append(record)
    return write_summary(config, base, records, overlap=_overlap(prompts, eval_file))


def check_ready(config: Config) -> None:
    """What the rounds need beyond `Config.check`: the judge's settings and the evaluation's."""
    r, ev = config.rounds, config.evaluation
    if r.judge == "rule" and ev.rule is None and ev.pattern is None:
        raise ConfigError(
            "rounds.judge: rule needs evaluation.rule or evaluation.pattern (the rule it applies)"
        )
    if r.judge == "reward_model" and not ev.reward_model:
        raise ConfigError("rounds.judge: reward_model needs evaluation.reward_model")
    if ev.judge == "arena":
        raise ConfigError(
            "evaluation.judge: arena cannot evaluate each round (its votes are not per round); use rule or "
            "reward_model, and rounds.judge: arena to let people judge the candidates"
        )
    has_eval_split = config.data.eval is not None or config.data.eval_fraction > 0
    ev.check_ready(has_eval_split)


def round_prompts(config: Config) -> list[Prompt]:
    """rounds.prompts (the first rounds.num_prompts distinct), or the data's train split's."""
    from dpo_cluster.data.pipeline import prepare
    from dpo_cluster.evaluation.prompt_sets import load_prompt_file, split_prompts

    r = config.rounds
    if r.prompts is not None:
        return load_prompt_file(r.prompts, r.num_prompts)
    return split_prompts(config, prepare(config), "train", r.num_prompts)


def held_out_prompts_file(config: Config, out: Path) -> Path:
    """The prompts every round is evaluated on: evaluation.prompts, or the first
    evaluation.num_prompts of the data's eval split, written once to output_dir."""
    from dpo_cluster.data.pipeline import prepare
    from dpo_cluster.evaluation.prompt_sets import split_prompts

    ev = config.evaluation
    if ev.prompts is not None:
        return Path(ev.prompts)
    path = out / EVAL_PROMPTS_FILE
    _cached_prompts(path, lambda: split_prompts(config, prepare(config), "eval", ev.num_prompts))
    return path


def run_round(
    config: Config,
    k: int,
    round_dir: Path,
    prompts: list[Prompt],
    base: str,
    previous: str,
    eval_file: Path,
    *,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One round, resumed step by step from what round_dir holds; returns its record."""
    from dpo_cluster.evaluation.run import run_evaluation
    from dpo_cluster.rounds.pairing import build_pairs, check_accounting, keep_candidates
    from dpo_cluster.rounds.settings import evaluation_config, training_config
    from dpo_cluster.train.run import run_training

    round_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    log(
        f"round {k}/{config.rounds.num_rounds}: {config.rounds.samples_per_prompt} answers to each of {len(prompts)} prompts from {previous}"
    )
    candidates, refused = _candidates(config, k, round_dir, prompts, previous, progress)
    seconds["sample"] = time.perf_counter() - started
    kept, candidates_report = keep_candidates(candidates)
    texts = {(c.prompt_index, c.sample): c.text for c in candidates}
    mark = time.perf_counter()
    log(f"round {k}: judging ({config.rounds.judge})")
    comparisons = _comparisons(config, round_dir, prompts, kept, texts)
    seconds["judge"] = time.perf_counter() - mark
    rows, pairs_report = build_pairs(prompts, refused, kept, texts, comparisons, config.rounds.pairing)
    report = {"round": k, "candidates": candidates_report, **pairs_report}
    check_accounting(report)
    pairs_file = round_dir / "pairs.jsonl"
    write_jsonl(pairs_file, rows)
    write_json(round_dir / "report.json", report)
    if not rows:
        raise DataError(
            f"round {k}: the judge decided no pair, so there is nothing to train on (see {round_dir / 'report.json'})"
        )
    log(f"round {k}: {len(rows)} pairs; DPO from {previous}")
    mark = time.perf_counter()
    train_config = training_config(config, round_dir, pairs_file, previous, base)
    final = Path(train_config.output_dir) / "final"
    summary_file = final / "metrics_summary.json"
    training = (
        json.loads(summary_file.read_text()) if summary_file.is_file() else run_training(train_config).metrics
    )
    seconds["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    evaluations: dict[str, Any] = {}
    for name, against in (("vs_base", base), ("vs_previous", previous)):
        output = round_dir / f"eval_{name}.json"
        if name == "vs_previous" and previous == base:
            evaluations[name] = evaluations["vs_base"]  # round 1: the previous policy is the base
            continue
        if not output.is_file():
            log(f"round {k}: evaluating against {'the base' if name == 'vs_base' else 'the previous round'}")
            run_evaluation(
                evaluation_config(config, round_dir, pairs_file, against, str(final), eval_file, output),
                progress=progress,
            )
        evaluations[name] = json.loads(output.read_text())
    seconds["evaluate"] = time.perf_counter() - mark
    return {
        "round": k,
        "policy": str(final),
        "started_from": previous,
        "reference": train_config.reference.name_or_path or previous,
        "report": report,
        "training": {
            key: training.get(key) for key in ("steps", "loss", "rewards/accuracies", "rewards/margins")
        },
        "vs_base": _judged(evaluations["vs_base"]),
        "vs_previous": _judged(evaluations["vs_previous"]),
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
    }


def _candidates(
    config: Config, k: int, round_dir: Path, prompts: list[Prompt], policy: str, progress: bool
) -> tuple[list[Candidate], list[int]]:
    from dpo_cluster.rounds.candidates import sample_candidates

    path = round_dir / "candidates.jsonl"
    if path.is_file():
        rows = read_jsonl(path)
        refused = json.loads((round_dir / "refused_prompts.json").read_text())
        return [Candidate(**row) for row in rows], [item["prompt_index"] for item in refused]
    candidates, skipped = sample_candidates(config, policy, prompts, k, progress=progress)
    write_json(round_dir / "refused_prompts.json", skipped)
    write_jsonl(path, [c.to_row() for c in candidates])
    return candidates, [item["prompt_index"] for item in skipped]


def _comparisons(
    config: Config,
    round_dir: Path,
    prompts: list[Prompt],
    kept: dict[int, list[int]],
    texts: dict[tuple[int, int], str],
) -> list[Comparison]:
    from dpo_cluster.rounds.comparisons import candidate_pairs, compare_by_scores, score_candidates

    path = round_dir / "comparisons.jsonl"
    if path.is_file():
        return [Comparison(**row) for row in read_jsonl(path)]
    pairs = candidate_pairs(kept)
    judge = config.rounds.judge
    if judge in ("rule", "reward_model"):
        kept_texts = {(i, s): texts[(i, s)] for i, samples in kept.items() for s in samples}
        comparisons = compare_by_scores(pairs, score_candidates(config, prompts, kept_texts))
    elif judge == "llm_judge":
        from dpo_cluster.rounds.llm_judge import LLMJudge

        comparisons = LLMJudge(config.rounds).compare(pairs, prompts, texts)
    else:
        from dpo_cluster.rounds.arena_judge import ArenaJudge

        comparisons = ArenaJudge(config.rounds, round_dir / "arena_battles.json").compare(
            pairs, prompts, texts
        )
    write_jsonl(path, [c.to_row() for c in comparisons])
    return comparisons


def _judged(report: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's verdict, without its examples: judge section, base and tuned names."""
    return {"base": report["base"], "tuned": report["tuned"], "judge": report["judge"]}


def _overlap(prompts: list[Prompt], eval_file: Path) -> int:
    from dpo_cluster.evaluation.prompt_sets import load_prompt_file, prompt_key

    held_out = {prompt_key(p) for p in load_prompt_file(eval_file, 10**9)}
    return sum(1 for p in prompts if prompt_key(p) in held_out)


def _cached_prompts(path: Path, build: Callable[[], list[Prompt]]) -> list[Prompt]:
    """Prompts read from `path`, or built and written there first (so a resumed run, and every
    round, uses the same ones even if the source changes)."""
    if path.is_file():
        return [row["prompt"] for row in read_jsonl(path)]
    prompts = build()
    write_jsonl(path, [{"prompt": p} for p in prompts])
    return prompts


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
