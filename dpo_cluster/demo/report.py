"""What both demos leave behind: report.md (what was trained, the metrics, the curves, the
evaluation table, answers side by side), demo_summary.json, and the live comparison printed once
the app serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config

TRAINING_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies")


def write_report(
    config: Config,
    intro: list[str],
    metrics: dict[str, Any],
    evaluation: dict[str, Any],
    extra: list[str] | None = None,
) -> Path:
    """output_dir/report.md: `intro`, the training table and curves, `extra` sections, the
    evaluation table, side-by-side examples; and demo_summary.json beside it."""
    out = Path(config.output_dir)
    lines = [
        "# dpo-cluster demo report",
        "",
        *intro,
        "",
        "## Training",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [
        f"| {k} | {metrics[k]:.4f} |" for k in TRAINING_SHOWN if isinstance(metrics.get(k), int | float)
    ]
    lines += ["", "![training curves](training_curves.png)", ""]
    lines += extra or []
    lines += ["## Evaluation", "", *evaluation_table(evaluation)]
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


def live_comparison(compare_url: str, config: Config, prompt: str) -> str:
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


def _cell(value: Any) -> str:
    if isinstance(value, list):  # a chat: show its last message
        value = value[-1]["content"] if value else ""
    return str(value).replace("|", "\\|").replace("\n", " ")
