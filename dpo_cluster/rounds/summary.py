"""The end of `dpo-cluster rounds`: rounds_summary.json (every round's accounting, training and
evaluations), rounds_win_rate.png (win rate per round against the base and the previous policy,
with 95% intervals) and rounds_serve.yaml (a config that serves the base and every round side by
side: `dpo-cluster serve --config output_dir/rounds_serve.yaml`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dpo_cluster.config import Config

SUMMARY_FILE = "rounds_summary.json"
PLOT_FILE = "rounds_win_rate.png"
SERVE_FILE = "rounds_serve.yaml"


def write_summary(
    config: Config, base: str, records: list[dict[str, Any]], *, overlap: int
) -> dict[str, Any]:
    out = Path(config.output_dir)
    summary = {
        "base": base,
        "rounds": records,
        "settings": {
            key: getattr(config.rounds, key)
            for key in ("num_rounds", "num_prompts", "samples_per_prompt", "judge", "pairing", "reference")
        },
        # Prompts sampled in the rounds that are also held-out evaluation prompts (0 is a clean test).
        "held_out_overlap": overlap,
        "plot": str(out / PLOT_FILE),
        "serve_config": str(write_serve_config(config, base, records, out / SERVE_FILE)),
    }
    plot_win_rates(records, out / PLOT_FILE)
    (out / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return summary


def write_serve_config(config: Config, base: str, records: list[dict[str, Any]], path: Path) -> Path:
    """A serve config: the base, the last round as "tuned", and every earlier round as round-K."""
    serve: dict[str, Any] = {"base": base, "tuned": records[-1]["policy"]}
    earlier = {f"round-{r['round']}": r["policy"] for r in records[:-1]}
    if earlier:
        serve["models"] = earlier
    raw = {"output_dir": config.output_dir, "model": {"name_or_path": base}, "serve": serve}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def win_rate(judged: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation's tuned-vs-other win rate with its interval (ties left out), if it has one."""
    return judged["judge"].get("win_rate")


def plot_win_rates(records: list[dict[str, Any]], out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    for key, label, shift in (("vs_base", "vs base", -0.05), ("vs_previous", "vs previous round", 0.05)):
        points = [(r["round"], win_rate(r[key])) for r in records]
        points = [(k, w) for k, w in points if w is not None and w.get("rate") is not None]
        if not points:
            continue
        xs = [k + shift for k, _ in points]
        ys = [w["rate"] for _, w in points]
        errors = [[w["rate"] - w["ci_low"] for _, w in points], [w["ci_high"] - w["rate"] for _, w in points]]
        ax.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="no difference")
    ax.set_xticks([r["round"] for r in records])
    ax.set_xlabel("round")
    ax.set_ylabel("win rate of the round's policy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Preference rounds: held-out win rate (95% intervals, ties left out)")
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def format_rounds(summary: dict[str, Any]) -> str:
    """One line per round for the terminal: pairs, training loss, win rates with intervals."""

    def rate(judged: dict[str, Any]) -> str:
        w = win_rate(judged)
        if not w or w.get("rate") is None:
            return "-"
        return f"{w['rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}] (n={w['n']})"

    lines = [f"{'round':<6} {'pairs':>6} {'loss':>7}  win rate vs base           vs previous"]
    for r in summary["rounds"]:
        loss = r["training"].get("loss")
        loss_text = f"{loss:7.4f}" if isinstance(loss, int | float) else f"{'-':>7}"
        lines.append(
            f"{r['round']:<6} {r['report']['pairs']['written']:>6} {loss_text}  "
            f"{rate(r['vs_base']):<26} {rate(r['vs_previous'])}"
        )
    return "\n".join(lines)
