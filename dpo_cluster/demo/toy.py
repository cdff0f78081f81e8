"""`dpo-cluster demo --model builtin:demo`: the fast demo on the project's own toy model. It
writes preference pairs for the trait (titles of 30-75 characters), prepares them with Ray Data,
trains DPO on 2 CPU workers and evaluates, in about five minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cluster.config import Config, load_config
from dpo_cluster.data.samples import generate_title_pairs, write_jsonl
from dpo_cluster.demo.report import write_report

DEMO_PAIRS = 3000
DEMO_SEED = 7
TOY_PROMPT = "Write a YouTube title for my video about sourdough bread."


def demo_config(output_dir: str | Path, *, pairs: int, overrides: list[str] | None = None) -> Config:
    """The demo's config: the built-in demo model, the generated pairs, DPO on 2 CPU workers."""
    output_dir = Path(output_dir)
    data_file = output_dir / "data" / "title_pairs.jsonl"
    # Rewritten only when missing or of another size: an unchanged file keeps its mtime, so the
    # data pipeline's cache of prepared pairs is reused on the next run.
    if not data_file.exists() or _count_lines(data_file) != pairs:
        write_jsonl(generate_title_pairs(pairs, seed=DEMO_SEED), data_file)
    base = [
        f"output_dir={output_dir}",
        "model.name_or_path=builtin:demo",
        f"data.train={data_file}",
        "data.eval_fraction=0.1",
        "data.max_length=128",
        "train.loss_type=sigmoid",
        "train.beta=0.2",
        "train.learning_rate=2e-4",
        "train.micro_batch_size=8",
        "train.num_epochs=1",
        "train.logging_steps=10",
        "train.eval_strategy=epoch",
        "train.save_strategy=epoch",
        "deepspeed.zero_stage=2",
        "scaling.num_workers=2",
        "evaluation.judge=rule",
        "evaluation.rule=title_length",
        "evaluation.num_prompts=200",
        "evaluation.max_new_tokens=48",
    ]
    return load_config(None, base + list(overrides or []))


def run_toy_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    pairs: int = DEMO_PAIRS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The toy demo up to its report; returns {"config", "metrics", "evaluation", "report"}.

    1. Builds (once, cached) "builtin:demo" and writes the preference pairs: video titles of
       30-75 characters preferred over terse or rambling ones.
    2. Ray Data prepares the pairs; Ray Train runs DPO with DeepSpeed on 2 CPU workers.
    3. Evaluates: held-out reward accuracy and margins, and the rate at which base and tuned show
       the preferred trait on held-out prompts (a rule judge), with 95% confidence intervals.
    4. Writes `report.md` in output_dir (metrics, curves, the evaluation table, examples).
    Serving is the caller's: `dpo-cluster demo` starts it unless --no-serve (`live_comparison`).
    """
    from dpo_cluster.evaluation.run import run_evaluation
    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.train.run import run_training

    print("[1/4] the demo base model (built once, then cached) and the preference pairs", flush=True)
    config = demo_config(output_dir, pairs=pairs, overrides=overrides)
    resolve_name_or_path(config.model.name_or_path)  # build here, before any worker needs it
    print("[2/4] Ray Data prepares the pairs; Ray Train runs DPO with DeepSpeed on 2 CPU workers", flush=True)
    training = run_training(config)
    print("[3/4] evaluating base vs tuned on the held-out prompts", flush=True)
    evaluation = run_evaluation(config)
    intro = [
        "DPO on video-title preferences: a title of 30-75 characters is preferred over a terse or",
        f"rambling one. Base model `{config.model.name_or_path}`, tuned model `{training.final_dir}`.",
    ]
    report = write_report(config, intro, training.metrics, evaluation)
    print(f"[4/4] report: {report}", flush=True)
    return {"config": config, "metrics": training.metrics, "evaluation": evaluation, "report": report}


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f)
