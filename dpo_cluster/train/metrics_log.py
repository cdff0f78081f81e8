"""Where logged metrics go on the main worker: `output_dir/metrics.jsonl` (one JSON object per
logged step, TRL's metric names, eval rows prefixed `eval_`), TensorBoard event files under
`output_dir/tensorboard/`, a progress bar with ETA, and, where `tracking` turns them on, MLflow and
W&B runs (`dpo_cluster.train.tracking`: the same names and steps, the config, final/'s location).
Other workers write nothing. Each row carries `monotonic_time`, when it was logged, so that step
times can be measured from outside."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.train.tracking import Tracker, call_each, start_trackers, tracked_metrics

if TYPE_CHECKING:
    from dpo_cluster.config import Config

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# time.monotonic() (seconds) when a row was logged: one clock for every process on the machine, so a
# benchmark compares step ends stamped here with those stamped in another trainer's process.
MONOTONIC_KEY = "monotonic_time"


class MetricsLog:
    def __init__(
        self,
        output_dir: Path,
        *,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        config: Config | None = None,
    ) -> None:
        """`config`: the run's, whose `tracking` section says which trackers to log to (none without)."""
        self.enabled = enabled
        self._bar = None
        self._writer = None
        self._trackers: list[Tracker] = []
        self._total_steps = total_steps
        self._last_step = initial_step
        if not enabled:
            return
        from tqdm.auto import tqdm

        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE
        if initial_step == 0:
            self.path.write_text("")  # a fresh run starts a fresh log; a resumed one appends
        else:
            self._drop_rows_after(initial_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=initial_step or None)
        except ImportError:  # tensorboard is optional; metrics.jsonl has everything
            self._writer = None
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="DPO", unit="step", dynamic_ncols=True)
        if config is not None and (config.tracking.mlflow.enabled or config.tracking.wandb.enabled):
            self._trackers = start_trackers(config, initial_step)

    def _drop_rows_after(self, step: int) -> None:
        """A run resumed from step N re-does the steps after N: drop their stale rows."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # The loop logs a step after its optimizer step, LR step and gradient reset, and after the
        # step's metric sums came back to the CPU through `.cpu()`, which waits for the device's
        # queued work: stamped first thing here, before this row's file and TensorBoard writes, the
        # stamp marks the step's end as TRL's `on_step_end` does (after its optimizer step, LR step
        # and zero_grad, before the Trainer logs). With an evaluation due, it comes after that too.
        stamp = time.monotonic()
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        row[MONOTONIC_KEY] = stamp
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = int(metrics["step"])
        self._last_step = step
        if self._trackers:
            call_each(self._trackers, "log", tracked_metrics(metrics), step)
        if self._writer is not None:
            for key, value in metrics.items():
                if key not in ("step",) and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._bar is not None:
            shown = {k: metrics[k] for k in ("loss", "eval_loss", "rewards/accuracies") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        """Close the progress bar and TensorBoard. Trackers stay open for `finish` when the last
        step was logged (the loop logs it always); a run that stopped before it ends them as failed."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._trackers and self._last_step < self._total_steps:
            call_each(self._trackers, "fail")
            self._trackers = []

    def finish(self, final_dir: Path) -> None:
        """After final/ is written: record its location in the trackers and end their runs."""
        if self._trackers:
            call_each(self._trackers, "finish", final_dir)
            self._trackers = []
