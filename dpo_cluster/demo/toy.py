"""`dpo-cluster demo`: the whole product, end to end, on its embedded default (its own base model,
preference pairs, DPO, evaluation, report and serving), so one command with no data or model hub
shows every part working together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config, load_config
from dpo_cluster.data.samples import generate_title_pairs, write_jsonl

DEMO_PAIRS = 3000
DEMO_SEED = 7
DEMO_PROMPT = "Write a YouTube title for my video about sourdough bread."


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


def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    pairs: int = DEMO_PAIRS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The demo up to its report; returns {"config", "training", "evaluation", "report"}.

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
    report = write_report(config, training.metrics, evaluation)
    print(f"[4/4] report: {report}", flush=True)
    return {"config": config, "training": training, "evaluation": evaluation, "report": report}


def write_report(config: Config, metrics: dict[str, Any], evaluation: dict[str, Any]) -> Path:
    """output_dir/report.md: what was trained, the evaluation table, side-by-side examples."""
    out = Path(config.output_dir)
    lines = [
        "# dpo-cluster demo report",
        "",
        "DPO on video-title preferences: a title of 30-75 characters is preferred over a terse or",
        f"rambling one. Base model `{config.model.name_or_path}`, tuned model `{out / 'final'}`.",
        "",
        "## Training",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    shown = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies")
    lines += [f"| {k} | {metrics[k]:.4f} |" for k in shown if k in metrics]
    lines += ["", "![training curves](training_curves.png)", "", "## Evaluation", ""]
    lines += evaluation_table(evaluation)
    examples = evaluation.get("examples", [])
    if examples:
        lines += ["", "## Side by side", "", "| prompt | base | tuned |", "|---|---|---|"]
        for ex in examples:
            lines.append(f"| {_cell(ex['prompt'])} | {_cell(ex['base'])} | {_cell(ex['tuned'])} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "demo_summary.json").write_text(
        json.dumps({"metrics": metrics, "evaluation": evaluation}, indent=2)
    )
    return path


def evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation's table, as `dpo-cluster eval` prints it, in a code block."""
    from dpo_cluster.evaluation.report import format_eval_report

    return ["```", format_eval_report(evaluation), "```"]


def live_comparison(compare_url: str, config: Config, prompt: str = DEMO_PROMPT) -> str:
    """Ask the running app's /v1/compare one question and format both answers."""
    import urllib.request

    from dpo_cluster.serving.app import read_api_key

    key = read_api_key(config.serve.api_key_env, config.serve.api_key_file)
    body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 48, "temperature": 0}
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(compare_url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        result = json.loads(response.read())
    return "\n".join(
        [
            f"live comparison (POST {compare_url}):",
            f"  prompt: {prompt}",
            f"  base:   {result['base']['text']}  ({result['base']['latency_s']:.2f} s)",
            f"  tuned:  {result['tuned']['text']}  ({result['tuned']['latency_s']:.2f} s)",
        ]
    )


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f)


def _cell(value: Any) -> str:
    if isinstance(value, list):  # a chat: show its last message
        value = value[-1]["content"] if value else ""
    return str(value).replace("|", "\\|").replace("\n", " ")
