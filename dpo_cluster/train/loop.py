"""The per-worker DPO training loop, run against a `WorkerContext`.

The same function runs in every Ray Train worker and in a plain process (tests, one GPU):

    model + reference -> deepspeed.initialize -> [resume] -> for each optimizer step:
        for each of this worker's micro-batches (a fixed number of pairs, or cut by a token
        budget: train.max_tokens_per_micro_batch): one concatenated chosen/rejected forward
        (padded, or packed without padding: train.packing), reference log-probs, DPO loss,
        engine.backward, engine.step (DeepSpeed accumulates up to the step's last micro-batch)
        -> metric sums all-reduced over workers -> log / evaluate / checkpoint when due
    -> [load best] -> final/ in Hugging Face format

Every worker runs the same number of steps and evaluation batches, so the collectives inside
DeepSpeed (gradient reduction, ZeRO-3 parameter gathering) always line up.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.config import Config
from dpo_cluster.train.checkpoint import export_final, load_state, save_state
from dpo_cluster.train.context import Batch, WorkerContext
from dpo_cluster.train.forward import SUM_KEYS, build_loss_settings, compute_micro_batch, sums_to_metrics
from dpo_cluster.train.metrics_log import MetricsLog
from dpo_cluster.train.token_budget import TokenBudget

FINAL_DIR = "final"

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's rows."""


def steps_per_epoch(config: Config, num_rows: int, world_size: int) -> int:
    """Optimizer steps in one pass: full global batches only (the remainder waits for the next epoch)."""
    return num_rows // config.train.pairs_per_step(world_size)


def total_steps(config: Config, num_rows: int, world_size: int) -> int:
    per_epoch = steps_per_epoch(config, num_rows, world_size)
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(config.train.num_epochs * per_epoch))


def _ensure_distributed(ctx: WorkerContext, backend: str) -> None:
    """Ray Train sets up torch.distributed; a plain single process gets a 1-worker group."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if ctx.world_size != 1:
        raise RuntimeError("torch.distributed is not initialized but world_size > 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():  # fmt: skip
        # Set, not defaulted: values inherited from a parent process that trained in-process too
        # name a port that process still listens on.
        os.environ[key] = value
    deepspeed.init_distributed(dist_backend=backend)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _plain_grad_norm(engine: Any) -> float:
    """2-norm of all gradients of a DeepSpeed engine without ZeRO (full gradients on every worker)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _disable_dropout(model: torch.nn.Module) -> None:
    # As TRL's DPOTrainer does by default: dropout would make policy and reference log-probs
    # differ by noise at the first step, and the DPO reward is a difference of log-probs.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def train_loop(config: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Train with DPO; returns the final metrics (every worker gets the same dict)."""
    use_gpu = config.scaling.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # read when deepspeed imports
    import deepspeed
    import torch.distributed as dist

    from dpo_cluster.batch.collate import collate_pairs
    from dpo_cluster.batch.packing import pack_pairs, packing_route
    from dpo_cluster.modeling import load_policy, load_reference, load_tokenizer, reference_context
    from dpo_cluster.train.deepspeed_config import build_deepspeed_config, resolve_precision
    from dpo_cluster.train.schedule import build_lr_scheduler

    _ensure_distributed(ctx, "nccl" if use_gpu else "gloo")
    _seed_everything(config.train.seed)
    train = config.train
    micro, accum = train.micro_batch_size, train.gradient_accumulation_steps
    per_epoch = steps_per_epoch(config, ctx.train.num_rows, ctx.world_size)
    if per_epoch == 0:
        raise ValueError(
            f"{ctx.train.num_rows} training pairs are fewer than one global batch "
            f"({train.pairs_per_step(ctx.world_size)} = train.micro_batch_size x gradient_accumulation_steps "
            "x scaling.num_workers)"
        )
    steps = total_steps(config, ctx.train.num_rows, ctx.world_size)

    tokenizer = load_tokenizer(config.tokenizer_path(), trust_remote_code=config.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_policy(config.model, config.lora)
    ref_mode = config.reference.resolved_mode(config.lora.enabled)
    # None unless mode is model: adapter_disabled reuses the policy, precompute / precomputed read
    # the reference log-probs from the data, so those workers hold no second model.
    reference = load_reference(config.model, config.reference, config.lora)
    if train.disable_dropout:
        _disable_dropout(policy)
        if reference is not None:
            _disable_dropout(reference)

    bf16_ok = use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds_config = build_deepspeed_config(config, world_size=ctx.world_size, bf16_supported=bf16_ok)
    warmup = math.ceil(train.warmup_ratio * steps)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return build_lr_scheduler(optimizer, train.lr_scheduler, warmup_steps=warmup, total_steps=steps)

    engine, _, _, scheduler = deepspeed.initialize(
        model=policy,
        model_parameters=[p for p in policy.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=make_scheduler,
    )
    device = engine.device
    if ctx.world_size == 1 and config.deepspeed.zero_stage == 0:
        # One worker has nothing to average, but DeepSpeed's no-ZeRO path would still flatten every
        # gradient into one buffer at each step boundary (a second full copy of the gradients, the
        # top of the memory curve) and all-reduce it with itself.
        engine.enable_backward_allreduce = False
    if reference is not None:
        reference = _prepare_reference(reference, ds_config, config.deepspeed.zero_stage, device)

    def reference_logps(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch.num_pairs
        # precompute: the reference stage (dpo_cluster.data.reference_logps) has added the columns
        # to the data before training; from here on it is the same as precomputed.
        if ref_mode in ("precompute", "precomputed"):
            if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
                where = (
                    "run_training adds them; with run_local pass the reference stage's split "
                    "directories (ReferenceLogps.split_dir)"
                    if ref_mode == "precompute"
                    else "add them to the data"
                )
                raise ValueError(
                    f"reference.mode is {ref_mode} but the data has no ref_chosen_logps / "
                    f"ref_rejected_logps columns ({where})"
                )
            return batch.ref_chosen_logps, batch.ref_rejected_logps
        model = engine.module if ref_mode == "adapter_disabled" else reference
        with reference_context(engine.module, ref_mode):
            logps, _, _ = sequence_logps(model, batch)
        return logps[:n].detach(), logps[n:].detach()

    settings = build_loss_settings(train)
    precision = resolve_precision(config.deepspeed.precision, use_gpu, bf16_ok)

    # Micro-batch layout (dpo_cluster.batch.packing): packed rows where every model scoring them
    # supports it, else padded rows, grouped by length when asked for or when packing falls back.
    group_window = train.length_group_window if train.group_by_length else None
    route, route_note = packing_route(engine.module, reference) if train.packing else (None, "")
    if train.packing and route is None:
        group_window = train.length_group_window
        if ctx.is_main:
            logger.warning("train.packing: padded micro-batches grouped by length instead, as %s", route_note)
    elif route is not None and ctx.is_main:
        logger.info("train.packing: %s", route_note)

    def make_batch(raw: Batch) -> MicroBatch:
        if route is None:
            return collate_pairs(raw, pad_id)
        return pack_pairs(raw, pad_id, row_tokens=train.packing_row_tokens, varlen=route == "varlen")

    # Token-budget micro-batches (dpo_cluster.train.token_budget): the same pairs per step, cut into
    # forwards by what they cost in the layout chosen above.
    budget = None
    if train.max_tokens_per_micro_batch is not None:
        budget = TokenBudget(train.max_tokens_per_micro_batch, route or "padded", train.packing_row_tokens)
    share = micro * accum  # this worker's pairs per optimizer step, however they are cut

    def train_step(micro_batches: list[Batch], step: int) -> torch.Tensor:
        """Forward and backward over this worker's micro-batches of one step, then the update.
        Each loss is weighted by its micro-batch's share of the worker's pairs, so the gradient is
        the mean over the step's pairs whatever the cut; the last micro-batch is the accumulation
        boundary (DeepSpeed's own micro-step count assumes a fixed number per step)."""
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
        for index, raw in enumerate(micro_batches):
            batch = make_batch(raw).to(device)
            result = compute_micro_batch(engine, reference_logps, batch, settings)
            _check_finite(result.loss, step, raw, device)
            boundary = index == len(micro_batches) - 1
            engine.set_gradient_accumulation_boundary(boundary)
            engine.backward(result.loss * (batch.num_pairs / share), scale_wrt_gas=False)
            if boundary:
                grad_norm[0] = _plain_grad_norm(engine) if config.deepspeed.zero_stage == 0 else None
            engine.step()
            sums += result.sums
        return sums

    # DeepSpeed reports the gradient norm under ZeRO 1-3 only; without ZeRO it is measured here,
    # after the gradients are averaged over workers and before clipping (as DeepSpeed reports it).
    grad_norm: list[float | None] = [None]

    def evaluate(step: int) -> dict[str, float]:
        assert ctx.eval is not None
        engine.eval()
        count = (ctx.eval.num_rows // micro) // ctx.world_size  # the same on every worker (ZeRO-3 gathers)
        batches = ctx.my_micro_batches(ctx.eval, micro, 0, length_group_window=group_window, seed=train.seed)
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
        with torch.no_grad():
            for _, raw in itertools.islice(batches, count):
                sums += compute_micro_batch(
                    engine, reference_logps, make_batch(raw).to(device), settings
                ).sums
        engine.train()
        return sums_to_metrics(_all_reduce(sums, device), prefix="eval_") | {
            "eval_pairs": count * micro * ctx.world_size
        }

    state: dict[str, Any] = {"step": 0, "best": None, "last_eval": {}}
    if ctx.resume_checkpoint is not None:
        state |= load_state(engine, ctx.resume_checkpoint, rank=ctx.rank)
    log = MetricsLog(
        Path(config.output_dir), total_steps=steps, initial_step=state["step"], enabled=ctx.is_main
    )
    window = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    window_started, window_steps = time.perf_counter(), 0
    has_eval = (
        ctx.eval is not None and ctx.eval.num_rows >= micro * ctx.world_size and train.eval_strategy != "no"
    )
    step = state["step"]
    try:
        while step < steps:
            epoch, done_in_epoch = divmod(step, per_epoch)
            my_steps = ctx.my_steps(ctx.train, micro, accum, epoch, length_group_window=group_window,
                                    seed=train.seed, token_budget=budget)  # fmt: skip
            for _ in range(done_in_epoch):  # the data position of a resumed run
                next(my_steps)
            for _ in range(done_in_epoch, per_epoch):
                if step >= steps:
                    break
                window += _all_reduce(train_step(next(my_steps), step + 1), device)
                step += 1
                window_steps += 1
                log.advance()
                last = step == steps
                epoch_end = step % per_epoch == 0
                metrics: dict[str, Any] = {}
                if step % train.logging_steps == 0 or last:
                    elapsed = time.perf_counter() - window_started
                    metrics = sums_to_metrics(window) | {
                        "grad_norm": _float(
                            grad_norm[0] if grad_norm[0] is not None else engine.get_global_grad_norm()
                        ),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "tokens_per_second": window[SUM_KEYS.index("tokens")].item() / max(elapsed, 1e-9),
                        "seconds_per_step": elapsed / max(window_steps, 1),
                        # Forward passes per optimizer step over all workers (varies with a token budget).
                        "micro_batches_per_step": window[SUM_KEYS.index("micro_batches")].item()
                        / max(window_steps, 1),
                    }
                    window.zero_()
                    window_started, window_steps = time.perf_counter(), 0
                eval_due = has_eval and (
                    last
                    or (train.eval_strategy == "steps" and step % train.eval_steps == 0)
                    or (train.eval_strategy == "epoch" and epoch_end)
                )
                save_due = train.save_strategy != "no" and (
                    last
                    or (train.save_strategy == "steps" and step % train.save_steps == 0)
                    or (train.save_strategy == "epoch" and epoch_end)
                )
                if save_due and has_eval and not eval_due and train.best_metric.startswith("eval_"):
                    eval_due = True  # a checkpoint is ranked by a fresh eval metric
                if eval_due:
                    state["last_eval"] = evaluate(step)
                    metrics |= state["last_eval"]
                if metrics or save_due:
                    metrics |= {"step": step, "epoch": step / per_epoch}
                    log.log(metrics)
                if save_due:
                    state["step"] = step
                    _update_best(state, train.best_metric, train.best_mode, step)
                    _save_and_report(engine, ctx, state, metrics)
                elif metrics:
                    ctx.report(metrics, None, None)
    finally:
        log.close()

    if train.load_best_at_end:
        best = ctx.best_checkpoint()
        if best is not None:
            load_state(engine, best, rank=ctx.rank, weights_only=True)
    summary = {"steps": step, "epochs": step / per_epoch, "precision": precision, **state["last_eval"]}
    export_final(engine, tokenizer, config, Path(config.output_dir) / FINAL_DIR, rank=ctx.rank,
                 metrics_summary=summary)  # fmt: skip
    dist.barrier()
    return summary


def _prepare_reference(reference: torch.nn.Module, ds_config: dict[str, Any], zero_stage: int,
                       device: torch.device) -> Any:  # fmt: skip
    """Under ZeRO-3 the frozen reference is sharded like the policy (an engine with no optimizer);
    otherwise it is simply moved to the device."""
    if zero_stage != 3:
        return reference.to(device).eval()
    import deepspeed

    ref_config = {
        k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")
    }
    engine, *_ = deepspeed.initialize(model=reference, config=ref_config)
    engine.eval()
    return engine


def _all_reduce(sums: torch.Tensor, device: torch.device) -> torch.Tensor:
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


def _update_best(state: dict[str, Any], metric: str, mode: str, step: int) -> None:
    value = state["last_eval"].get(metric)
    if value is None:
        return
    best = state["best"]
    if best is None or (value < best["value"] if mode == "min" else value > best["value"]):
        state["best"] = {"step": step, "value": value}


def _save_and_report(engine: Any, ctx: WorkerContext, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    step = state["step"]
    staging = Path(tempfile.mkdtemp(prefix=f"ckpt-{step:07d}-", dir=ctx.scratch_dir))
    save_state(engine, staging, rank=ctx.rank, client_state=state)
    ctx.report(metrics | state["last_eval"] | {"step": step}, staging, f"step-{step:07d}")
