"""The per-worker DPO training loop, run against a `WorkerContext` so that the same function runs in
every Ray Train worker and in a plain process (tests, one GPU): setup, [resume], optimizer steps
with logging, evaluation and checkpoints when due, [load best], final/ in Hugging Face format.
Every worker runs the same number of steps, forwards and evaluation batches, so the collectives
inside DeepSpeed (gradient reduction, ZeRO-3 parameter gathers) always line up.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpo_cluster.config import Config, TrainConfig
from dpo_cluster.train.checkpoint import export_final, load_state, merge_final, save_state
from dpo_cluster.train.context import Batch, WorkerContext
from dpo_cluster.train.forward import SUM_KEYS, compute_micro_batch, sums_to_metrics
from dpo_cluster.train.metrics_log import MetricsLog
from dpo_cluster.train.ref_sync import load_reference_weights, save_reference, sync_due, sync_reference
from dpo_cluster.train.setup import BatchLayout, TrainSetup, build_setup

FINAL_DIR = "final"

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's rows."""


@dataclass
class LoopState:
    """The loop's progress: what a checkpoint carries besides the engine, and the last step's
    gradient norm."""

    step: int = 0  # optimizer steps done
    best_step: int | None = None  # the checkpointed step with the best train.best_metric so far
    best_value: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)  # the latest evaluation's metrics
    last_train: dict[str, float] = field(default_factory=dict)  # the latest logged training metrics
    grad_norm: float | None = None  # measured here without ZeRO; DeepSpeed reports it under ZeRO

    @classmethod
    def from_client_state(cls, saved: dict[str, Any]) -> LoopState:
        """The state a checkpoint's `client_state` holds (DeepSpeed's own keys beside it are left out)."""
        best = saved.get("best")
        return cls(
            step=saved.get("step", 0),
            best_step=best["step"] if best else None,
            best_value=best["value"] if best else None,
            last_eval=dict(saved.get("last_eval", {})),
            last_train=dict(saved.get("last_train", {})),
        )

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint stores: {"step", "best": {"step", "value"} or None, "last_eval", "last_train"}."""
        best = None if self.best_step is None else {"step": self.best_step, "value": self.best_value}
        return {"step": self.step, "best": best, "last_eval": self.last_eval, "last_train": self.last_train}

    def update_best(self, metric: str, mode: str) -> None:
        """Make the current step the best if the latest evaluation's `metric` beats the best so far."""
        value = self.last_eval.get(metric)
        if value is None:
            return
        if self.best_value is None or (value < self.best_value if mode == "min" else value > self.best_value):
            self.best_step, self.best_value = self.step, value


@dataclass
class MetricWindow:
    """Metric sums (len(SUM_KEYS),) float64 over all workers of the steps since the last logged one."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SUM_KEYS), dtype=torch.float64))
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def add(self, sums: torch.Tensor) -> None:
        self.sums += sums
        self.steps += 1

    def flush(self, setup: TrainSetup, grad_norm: float | None) -> dict[str, float]:
        """The window's training metrics (TRL's names, throughput), and a fresh window."""
        elapsed = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        metrics = sums_to_metrics(self.sums) | {
            "grad_norm": _float(grad_norm if grad_norm is not None else setup.engine.get_global_grad_norm()),
            "learning_rate": setup.scheduler.get_last_lr()[0],
            "tokens_per_second": self.sums[SUM_KEYS.index("tokens")].item() / max(elapsed, 1e-9),
            "seconds_per_step": elapsed / steps,
            # Forward passes per optimizer step over all workers (varies with a token budget).
            "micro_batches_per_step": self.sums[SUM_KEYS.index("micro_batches")].item() / steps,
        }
        self.sums.zero_()
        self.started, self.steps = time.perf_counter(), 0
        return metrics


def train_loop(config: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Train with DPO; returns the final metrics (every worker gets the same dict)."""
    setup = build_setup(config, ctx)
    _log_layout(setup.layout, config.train.packing, ctx)
    state = LoopState()
    with ctx.resume_checkpoint() as resume:
        if resume is not None:
            state = LoopState.from_client_state(
                load_state(setup.engine, resume, rank=ctx.rank, config=config)
            )
            if config.train.sync_ref_model:
                load_reference_weights(setup.reference.model, resume)
    log = MetricsLog(Path(config.output_dir), total_steps=setup.steps, initial_step=state.step,
                     enabled=ctx.is_main, config=config)  # fmt: skip
    window = MetricWindow()
    try:
        for step, micro_batches in _step_batches(setup, ctx, state.step):
            sums, state.grad_norm = _run_step(setup, micro_batches, step)
            if sync_due(config.train, step):  # TR-DPO: after the optimizer step, as TRL's callback
                sync_reference(setup.engine.module, setup.reference.model, config.train.ref_model_mixup_alpha)
            window.add(_all_reduce(sums, setup.device))
            state.step = step
            log.advance()
            _log_evaluate_save(setup, ctx, state, window, log)
    finally:
        log.close()
    summary = _finish(setup, ctx, state)
    log.finish(Path(config.output_dir) / FINAL_DIR)  # trackers record final/, then end their runs
    return summary


def _log_layout(layout: BatchLayout, packing: bool, ctx: WorkerContext) -> None:
    if not (packing and ctx.is_main):
        return
    if layout.route is None:
        logger.warning("train.packing: padded micro-batches grouped by length instead, as %s", layout.note)
    else:
        logger.info("train.packing: %s", layout.note)


def _step_batches(setup: TrainSetup, ctx: WorkerContext, start: int) -> Iterator[tuple[int, list[Batch]]]:
    """(step number, this worker's micro-batches of that step) for the steps after `start`; a resumed
    run starts its epoch's data at the first step not done yet."""
    train, step = setup.config.train, start
    while step < setup.steps:
        epoch, done_in_epoch = divmod(step, setup.per_epoch)
        my_steps = ctx.my_steps(ctx.train, train.micro_batch_size, train.gradient_accumulation_steps, epoch,
                                length_group_window=setup.layout.group_window, seed=train.seed,
                                token_budget=setup.layout.budget, start_step=done_in_epoch)  # fmt: skip
        for _ in range(done_in_epoch, setup.per_epoch):
            if step >= setup.steps:
                break
            step += 1
            yield step, next(my_steps)


def _run_step(setup: TrainSetup, micro_batches: list[Batch], step: int) -> tuple[torch.Tensor, float | None]:
    """Forward and backward over this worker's micro-batches of one step, then the update ->
    (this worker's metric sums (len(SUM_KEYS),) float64, the gradient norm without ZeRO, else None).

    Each loss is weighted by its micro-batch's share of the worker's pairs, so the gradient is the
    mean over the step's pairs whatever the cut; the last micro-batch is the accumulation boundary
    (DeepSpeed's own micro-step count assumes a fixed number per step).
    """
    engine, train = setup.engine, setup.config.train
    share = train.micro_batch_size * train.gradient_accumulation_steps  # this worker's pairs per step
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    grad_norm = None
    for index, raw in enumerate(micro_batches):
        batch = setup.layout.build_batch(raw).to(setup.device)
        result = compute_micro_batch(engine, setup.reference.compute_logps, batch, setup.settings)
        _check_finite(result.loss, step, raw, setup.device)
        boundary = index == len(micro_batches) - 1
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(result.loss * (batch.num_pairs / share), scale_wrt_gas=False)
        if boundary and setup.config.deepspeed.zero_stage == 0:
            # After the gradients are averaged over workers and before clipping, as DeepSpeed
            # reports it under ZeRO.
            grad_norm = _plain_grad_norm(engine)
        engine.step()
        sums += result.sums
    return sums, grad_norm


def _log_evaluate_save(
    setup: TrainSetup, ctx: WorkerContext, state: LoopState, window: MetricWindow, log: MetricsLog
) -> None:
    """After a step: log the window's metrics, evaluate and checkpoint when due, report to the context."""
    train, step = setup.config.train, state.step
    last = step == setup.steps
    metrics: dict[str, Any] = {}
    if step % train.logging_steps == 0 or last:
        metrics = window.flush(setup, state.grad_norm)
        state.last_train = dict(metrics)
    eval_due, save_due = _eval_and_save_due(train, step, last, step % setup.per_epoch == 0, setup.has_eval)
    if eval_due:
        state.last_eval = _evaluate(setup, ctx)
        metrics |= state.last_eval
    if metrics or save_due:
        metrics |= {"step": step, "epoch": step / setup.per_epoch}
        log.log(metrics)
    if save_due:
        state.update_best(train.best_metric, train.best_mode)
        _save_and_report(setup, ctx, state, metrics)
    elif metrics:
        ctx.report(metrics, None, None)


def _eval_and_save_due(
    train: TrainConfig, step: int, last: bool, epoch_end: bool, has_eval: bool
) -> tuple[bool, bool]:
    """Whether `train.eval_strategy` and `train.save_strategy` call for an evaluation and a
    checkpoint after `step`; the last step does both (where they are on at all)."""

    def due(strategy: str, every: int) -> bool:
        return last or (strategy == "steps" and step % every == 0) or (strategy == "epoch" and epoch_end)

    eval_due = has_eval and due(train.eval_strategy, train.eval_steps)
    save_due = train.save_strategy != "no" and due(train.save_strategy, train.save_steps)
    if save_due and has_eval and not eval_due and train.best_metric.startswith("eval_"):
        eval_due = True  # a checkpoint is ranked by a fresh eval metric
    return eval_due, save_due


def _evaluate(setup: TrainSetup, ctx: WorkerContext) -> dict[str, float]:
    """Eval metrics (prefixed `eval_`, and `eval_pairs`) over as many eval micro-batches as every
    worker has: the same count on every worker, as ZeRO-3's parameter gathers need."""
    assert ctx.eval is not None
    engine, micro, seed = setup.engine, setup.config.train.micro_batch_size, setup.config.train.seed
    engine.eval()
    count = (ctx.eval.num_rows // micro) // ctx.world_size
    batches = ctx.my_micro_batches(
        ctx.eval, micro, 0, length_group_window=setup.layout.group_window, seed=seed
    )
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    with torch.no_grad():
        for _, raw in itertools.islice(batches, count):
            batch = setup.layout.build_batch(raw).to(setup.device)
            sums += compute_micro_batch(engine, setup.reference.compute_logps, batch, setup.settings).sums
    engine.train()
    return sums_to_metrics(_all_reduce(sums, setup.device), prefix="eval_") | {
        "eval_pairs": count * micro * ctx.world_size
    }


def _save_and_report(
    setup: TrainSetup, ctx: WorkerContext, state: LoopState, metrics: dict[str, Any]
) -> None:
    """Collective: every worker writes its checkpoint files into local scratch and reports them."""
    step = state.step
    staging = Path(tempfile.mkdtemp(prefix=f"ckpt-{step:07d}-", dir=ctx.scratch_dir))
    save_state(setup.engine, staging, rank=ctx.rank, config=setup.config, client_state=state.client_state())
    if setup.config.train.sync_ref_model:
        save_reference(setup.reference.model, staging, ctx.rank)
    ctx.report(metrics | state.last_eval | {"step": step}, staging, f"step-{step:07d}")


def _finish(setup: TrainSetup, ctx: WorkerContext, state: LoopState) -> dict[str, Any]:
    """Load the best checkpoint's weights when asked, export final/ -> the run's summary."""
    import torch.distributed as dist

    config = setup.config
    if config.train.load_best_at_end:
        with ctx.best_checkpoint() as best:
            if best is not None:
                load_state(setup.engine, best, rank=ctx.rank, config=config, weights_only=True)
    # The last step always logs, so the summary has the final training metrics, and the final
    # evaluation's where there is an eval split.
    summary = {"steps": state.step, "epochs": state.step / setup.per_epoch, "precision": setup.precision,
               **state.last_train, **state.last_eval}  # fmt: skip
    final = Path(config.output_dir) / FINAL_DIR
    export_final(setup.engine, setup.tokenizer, config, final, rank=ctx.rank, metrics_summary=summary)
    dist.barrier()
    if ctx.is_main:
        merge_final(config, final)  # no collective follows: nobody waits on it
    return summary


def _plain_grad_norm(engine: Any) -> float:
    """2-norm of all gradients of a DeepSpeed engine without ZeRO (full gradients on every worker)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _all_reduce(sums: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum (K,) float64 over workers (through `device`, which the backend needs) -> (K,) on the CPU."""
    import torch.distributed as dist

    reduced = sums.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def _check_finite(loss: torch.Tensor, step: int, raw: Batch, device: torch.device) -> None:
    """All workers agree on whether any loss is non-finite, so they stop together (no hang)."""
    import torch.distributed as dist

    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        rows = list(raw.get("row_id", []))[:8]
        raise NonFiniteLossError(
            f"non-finite loss at optimizer step {step} (this worker's loss: {loss.item()}); rows of the "
            f"batch: {', '.join(map(str, rows)) or 'unknown'}. The last checkpoint is kept; lower "
            "train.learning_rate or check these rows."
        )


def _float(value: Any) -> float:
    return float(
        value.item() if isinstance(value, torch.Tensor) else (value if value is not None else float("nan"))
    )
