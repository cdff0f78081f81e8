"""Training curves as a PNG: loss, reward margin and reward accuracy per step, train and eval,
drawn from `metrics.jsonl` (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CURVES_FILE = "training_curves.png"
PANELS = (
    ("loss", "DPO loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
)


def plot_training_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Draw the curves; returns the PNG path, or None when there is nothing to draw."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style, label in (("", "-", "train"), ("eval_", "o--", "eval")):
            points = [(r["step"], r[prefix + key]) for r in rows if _finite(r.get(prefix + key))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=label, markersize=4)
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)  # a fraction: the full range, so small changes are not magnified
        if key == "loss":
            ax.axhline(
                math.log(2), color="grey", linewidth=0.8, linestyle=":", label="ln 2 (policy = reference)"
            )
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
