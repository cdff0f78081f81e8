"""Run the training loop in this process, without Ray: tests, debugging, one GPU.

`LocalReporter` plays Ray Train's part for checkpoints: it moves each reported checkpoint to
`output_dir/checkpoints/<name>`, keeps the `train.num_checkpoints_to_keep` most recent plus the best,
and answers "latest" (for resuming) and "best" (for `train.load_best_at_end`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpo_cluster.config import Config
from dpo_cluster.train.context import WorkerContext
from dpo_cluster.train.indexed_source import IndexedPairSource
from dpo_cluster.train.loop import train_loop

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class LocalReporter:
    root: Path
    num_to_keep: int
    metric: str
    mode: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None, name: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is None:
            return
        target = self.root / (name or checkpoint.name)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(checkpoint), str(target))
        self.checkpoints.append((target, dict(metrics)))
        best = self.best()
        while len(self.checkpoints) > self.num_to_keep:
            oldest = next((c for c in self.checkpoints if c[0] != best), None)
            if oldest is None:
                break
            self.checkpoints.remove(oldest)
            shutil.rmtree(oldest[0], ignore_errors=True)

    def latest(self) -> Path | None:
        return self.checkpoints[-1][0] if self.checkpoints else None

    def best(self) -> Path | None:
        scored = [(m[self.metric], p) for p, m in self.checkpoints if m.get(self.metric) is not None]
        if not scored:
            return None
        pick = min if self.mode == "min" else max
        return pick(scored, key=lambda item: item[0])[1]


def run_local(
    config: Config,
    train_dir: Path,
    eval_dir: Path | None = None,
    *,
    resume_checkpoint: Path | None = None,
    reporter: LocalReporter | None = None,
    reference_dir: Path | None = None,
) -> tuple[dict[str, Any], LocalReporter]:
    """Train on prepared split directories in this process (world size 1); with
    `reference.mode: precompute`, `reference_dir` is where the reference stage put its values
    (`compute_reference_logps(...).directory`, holding a fragment directory per split)."""
    output_dir = Path(config.output_dir)
    reporter = reporter or LocalReporter(
        output_dir / CHECKPOINTS_DIR,
        config.train.num_checkpoints_to_keep,
        config.train.best_metric,
        config.train.best_mode,
    )
    scratch = Path(tempfile.mkdtemp(prefix="dpo-scratch-"))

    def references(split: str) -> Path | None:
        return Path(reference_dir) / split if reference_dir is not None else None

    resume = resume_checkpoint or (Path(config.train.resume_from) if config.train.resume_from else None)
    ctx = WorkerContext(
        rank=0,
        world_size=1,
        local_rank=0,
        device=torch.device("cuda" if config.scaling.use_gpu else "cpu"),
        train=IndexedPairSource(train_dir, config.train.seed, config.train.shuffle, references("train")),
        eval=IndexedPairSource(eval_dir, config.train.seed, False, references("eval")) if eval_dir else None,
        report=reporter,
        resume_checkpoint=lambda: contextlib.nullcontext(resume),
        best_checkpoint=lambda: contextlib.nullcontext(reporter.best()),
        scratch_dir=scratch,
    )
    try:
        return train_loop(config, ctx), reporter
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
