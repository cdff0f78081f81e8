"""The evaluation report: written as one JSON object, printed as a short table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_FILE = "eval_report.json"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write `report` as indented JSON (NaN and infinities refused: every reader must parse it)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    return path


def _number(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _rate(rate: dict[str, Any]) -> str:
    """ "0.583 [0.320, 0.806]  7/12" from a `stats.rate_with_ci` dict."""
    return (
        f"{_number(rate['rate'])} [{_number(rate['ci_low'])}, {_number(rate['ci_high'])}]"
        f"  {rate['successes']}/{rate['n']}"
    )


def _reward_lines(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return ["held-out reward accuracy: skipped: " + section["skipped"]]
    lines = [f"held-out reward accuracy ({section['pairs']} eval pairs, beta {section['beta']:g})"]
    lines.append(f"  {'rewards/accuracies':<20} {_rate(section['rewards/accuracies'])}")
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
        lines.append(f"  {key:<20} {_number(section[key], 4, sign=True)}")
    return lines


def _judge_lines(section: dict[str, Any]) -> list[str]:
    judge = section["name"]
    if judge == "arena":
        subject, opponent = section["subject"], section["opponent"]
        counts = section["counts"]
        return [
            f"arena votes ({section['votes']} votes on {section['battles']} battles, {section['arena_db']})",
            f"  {subject} win rate vs {opponent}   {_rate(section['win_rate'])} (decisive votes)",
            f"  counts: {subject} {counts[subject]}, {opponent} {counts[opponent]}, "
            f"tie {counts['tie']}, both_bad {counts['both_bad']}",
        ]
    what = section.get("rule") or section.get("pattern") or section.get("reward_model")
    lines = [
        f"win rate, judge {judge} ({what}), {section['prompts']} prompts from {section['prompt_source']}"
    ]
    if section.get("skipped_prompts"):
        lines.append(f"  skipped prompts: {len(section['skipped_prompts'])} (see the JSON report)")
    counts = section["counts"]
    if judge == "rule":
        lines.append(f"  {'pass rate base':<24} {_rate(section['pass_rate']['base'])}")
        lines.append(f"  {'pass rate tuned':<24} {_rate(section['pass_rate']['tuned'])}")
        diff = section["difference"]
        lines.append(
            f"  {'difference tuned - base':<24} {_number(diff['difference'], sign=True)} "
            f"[{_number(diff['ci_low'], sign=True)}, {_number(diff['ci_high'], sign=True)}]"
        )
        ties = f"both pass {counts['ties_both_pass']}, neither {counts['ties_neither_pass']}"
    else:
        mean = section["mean_score"]
        lines.append(
            f"  {'mean score':<24} base {_number(mean['base'], 4)}, tuned {_number(mean['tuned'], 4)}, "
            f"difference {_number(section['mean_score_difference'], 4, sign=True)}"
        )
        ties = f"ties {counts['ties']}"
    lines.append(f"  {'tuned win rate':<24} {_rate(section['win_rate'])} (decisive prompts)")
    lines.append(
        f"  {'counts':<24} tuned wins {counts['tuned_wins']}, base wins {counts['base_wins']}, {ties}"
    )
    return lines


def format_eval_report(report: dict[str, Any]) -> str:
    """A short table of an evaluation report for the terminal."""
    lines = [f"base:  {report['base']}", f"tuned: {report['tuned']}", ""]
    lines += _reward_lines(report["reward_accuracy"])
    lines.append("")
    lines += _judge_lines(report["judge"])
    if report.get("output"):
        lines += ["", f"report: {report['output']}"]
    return "\n".join(lines)
