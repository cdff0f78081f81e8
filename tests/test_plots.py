"""Training curves from metrics.jsonl: drawn without a display, empty logs draw nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpo_cluster.plots import plot_training_curves


def test_curves_png_from_train_and_eval_rows(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss": math.log(2) / s, "rewards/margins": 0.1 * s, "rewards/accuracies": min(1.0, 0.2 * s)}
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 0.2, "eval_rewards/margins": 0.4, "eval_rewards/accuracies": 0.9,
          "grad_norm": None}]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_training_curves(metrics, tmp_path / "curves.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_training_curves(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
