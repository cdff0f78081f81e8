"""`dpo-cluster demo`: the whole product end to end with no data or model hub. By default one
on-policy preference round on a real pretrained model (`real`); `--model builtin:demo` runs the
faster demo on the project's own toy model (`toy`). Both end with the same report, and the caller
serves base and tuned side by side unless told not to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cluster.demo.real import HELD_OUT_IDEAS, REAL_MODEL, REAL_PROMPT, TRAIN_IDEAS, run_real_demo
from dpo_cluster.demo.toy import DEMO_PAIRS, TOY_PROMPT, run_toy_demo

TOY_MODEL = "builtin:demo"


def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    model: str = REAL_MODEL,
    pairs: int = DEMO_PAIRS,
    ideas: int = TRAIN_IDEAS,
    held_out: int = HELD_OUT_IDEAS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The demo on `model` up to its report: {"config", "metrics", "evaluation", "report",
    "prompt"} (the prompt the live comparison asks). `pairs` sizes the toy demo's data; `ideas`
    and `held_out` the real demo's prompts."""
    if model == TOY_MODEL:
        return run_toy_demo(output_dir, pairs=pairs, overrides=overrides) | {"prompt": TOY_PROMPT}
    result = run_real_demo(output_dir, model=model, ideas=ideas, held_out=held_out, overrides=overrides)
    return result | {"prompt": REAL_PROMPT}
