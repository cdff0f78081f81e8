"""What the per-worker training loop runs with, built once per run: the process group, seeds,
tokenizer, policy and reference, the DeepSpeed engine with its LR schedule, and the micro-batch
layout. Every worker builds these in the same order, seeded before any weights are made, so
random initialisation (LoRA adapters) and every later random draw agree across workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from dpo_cluster.batch.collate import collate_pairs, collate_sequences
from dpo_cluster.batch.fused_head import allow_grad_in_place
from dpo_cluster.batch.hidden_logps import find_output_head
from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.batch.packing import PackingRoute, pack_pairs, pack_sequences, packing_route
from dpo_cluster.batch.token_budget import TokenBudget
from dpo_cluster.batch.unpaired import UnpairedBatch, build_unpaired_batch
from dpo_cluster.config import Config, TrainConfig
from dpo_cluster.modeling import load_policy, load_reference, load_tokenizer, reference_context
from dpo_cluster.train.checkpoint import drop_tied_frozen_weights, trainable_only
from dpo_cluster.train.context import Batch, WorkerContext
from dpo_cluster.train.cpu_adam import load_cpu_adam
from dpo_cluster.train.deepspeed_config import build_deepspeed_config
from dpo_cluster.train.forward import LossSettings, build_loss_settings
from dpo_cluster.train.schedule import build_lr_scheduler


def init_process_group(ctx: WorkerContext, backend: str, timeout_s: int = 1800) -> None:
    """Ray Train sets up torch.distributed (with `scaling.timeout_s`); a plain single process gets
    a 1-worker group with the same timeout."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        # DeepSpeed's own handle on the group, which deepspeed.initialize would make later: ZeRO-3
        # loading (`zero3_loading`) sizes its partitions by it before that.
        deepspeed.init_distributed(dist_backend=backend)
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
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every CUDA device's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 in place."""
    # As TRL's DPOTrainer does by default: dropout would make policy and reference log-probs
    # differ by noise at the first step, and the DPO reward is a difference of log-probs.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@dataclass(frozen=True)
class ReferenceSource:
    """Where a micro-batch's reference log-probs come from, per `reference.mode`: a separate frozen
    model ("model"), the policy with its LoRA adapter off ("adapter_disabled"), or columns the data
    already carries ("precompute", "precomputed"); nowhere for a reference-free loss ("none")."""

    mode: str
    policy: torch.nn.Module  # the engine's module
    model: Any  # the frozen reference (a module, or an engine under ZeRO-3); None unless mode is model
    ld_alpha: float | None  # train.ld_alpha: LD-DPO weights the reference's log-probs as the policy's
    chunk_size: int = 0  # train.logps_chunk_size: completion tokens per output-head call; 0 = full logits

    def compute_logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the batch's B pairs -> (chosen (B,), rejected (B,)), without grad."""
        if self.mode == "none":
            raise ValueError(
                "reference.mode is none: the loss must be reference-free and ask for no reference"
            )
        if self.mode in ("precompute", "precomputed"):
            return _precomputed_logps(batch, self.mode)
        n = batch.num_pairs
        model = self.policy if self.mode == "adapter_disabled" else self.model
        with reference_context(self.policy, self.mode):
            logps, _, _ = sequence_logps(model, batch, ld_alpha=self.ld_alpha, chunk_size=self.chunk_size)
        return logps[:n].detach(), logps[n:].detach()


def _precomputed_logps(batch: MicroBatch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    # precompute: the reference stage (dpo_cluster.reference) has added the columns to the data
    # before training; from here on it is the same as precomputed.
    if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
        where = (
            "run_training adds them; with run_local pass the reference stage's values: "
            "run_local(..., reference_dir=compute_reference_logps(...).directory)"
            if mode == "precompute"
            else "add them to the data"
        )
        raise ValueError(
            f"reference.mode is {mode} but the data has no ref_chosen_logps / "
            f"ref_rejected_logps columns ({where})"
        )
    return batch.ref_chosen_logps, batch.ref_rejected_logps


@dataclass(frozen=True)
class BatchLayout:
    """How raw pairs become micro-batches (`dpo_cluster.batch.packing`): packed rows where every
    model scoring them supports it, else padded rows, grouped by length when asked for or when
    packing falls back; cut by a token budget when `train.max_tokens_per_micro_batch` is set."""

    route: PackingRoute | None  # None: padded rows
    note: str  # the packing route's description, or why packing fell back ("" without packing)
    group_window: int | None  # micro-batches per length-grouping window; None: stream order
    budget: TokenBudget | None
    pad_id: int
    row_tokens: int | None  # train.packing_row_tokens
    unpaired_max_length: int | None = None  # kto: data.max_length, the KL sequences' limit; else None

    def build_batch(self, raw: Batch) -> MicroBatch | UnpairedBatch:
        """A micro-batch of B pairs as columns -> padded rows (2B, T) or packed rows (R, L); for an
        unpaired loss, its examples and their KL sequences (`dpo_cluster.batch.unpaired`)."""
        if self.unpaired_max_length is not None:
            return build_unpaired_batch(raw, self.unpaired_max_length, self._collate_sequences)
        if self.route is None:
            return collate_pairs(raw, self.pad_id)
        return pack_pairs(raw, self.pad_id, row_tokens=self.row_tokens, varlen=self.route == "varlen")

    def _collate_sequences(
        self, prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray]
    ) -> MicroBatch:
        if self.route is None:
            return collate_sequences(prompts, completions, self.pad_id)
        return pack_sequences(
            prompts, completions, self.pad_id, row_tokens=self.row_tokens, varlen=self.route == "varlen"
        )


def build_layout(
    train: TrainConfig, policy: Any, reference: Any, pad_id: int, max_length: int | None = None
) -> BatchLayout:
    """The layout of `train.packing`, `train.group_by_length` and the token budget for these models;
    `max_length` (data.max_length) is needed for an unpaired loss (kto)."""
    group_window = train.length_group_window if train.group_by_length else None
    route, note = packing_route(policy, reference) if train.packing else (None, "")
    if train.packing and route is None:
        group_window = train.length_group_window
    budget = None
    if train.max_tokens_per_micro_batch is not None:
        # The same pairs per step, cut into forwards by what they cost in this layout.
        budget = TokenBudget(train.max_tokens_per_micro_batch, route or "padded", train.packing_row_tokens)
    unpaired_max_length = None
    if train.unpaired():
        if max_length is None:
            raise ValueError("build_layout: an unpaired loss needs max_length (data.max_length)")
        unpaired_max_length = max_length
    return BatchLayout(
        route, note, group_window, budget, pad_id, train.packing_row_tokens, unpaired_max_length
    )


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models loaded inside are partitioned as they load: transformers sees the
    DeepSpeed config (`HfDeepSpeedConfig`), builds the modules under `deepspeed.zero.Init` and
    copies each checkpoint tensor into its shards, so a rank holds its 1/world_size of the weights
    rather than the whole model first (a 7B policy and reference: 27 GB of host RAM per rank).
    Elsewhere it does nothing. The process group must exist (`init_process_group`)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_deepspeed = HfDeepSpeedConfig(ds_config)  # held by weak reference while it lives
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_deepspeed


def build_engine(
    config: Config, ctx: WorkerContext, policy: torch.nn.Module, ds_config: dict[str, Any], steps: int
) -> tuple[Any, Any]:
    """`deepspeed.initialize` over the policy's trainable weights, with the torch LR schedule of
    `train.lr_scheduler` over `steps` optimizer steps -> (engine, scheduler)."""
    import deepspeed

    train = config.train
    warmup = math.ceil(train.warmup_ratio * steps)
    if config.deepspeed.offload_optimizer == "cpu":
        load_cpu_adam()  # DeepSpeedCPUAdam would JIT-build it inside initialize, failing obscurely
    engine, _, _, scheduler = deepspeed.initialize(
        model=policy,
        model_parameters=[p for p in policy.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=partial(
            build_lr_scheduler, kind=train.lr_scheduler, warmup_steps=warmup, total_steps=steps
        ),
    )
    if trainable_only(config):
        drop_tied_frozen_weights(engine)
    if ctx.world_size == 1 and config.deepspeed.zero_stage == 0:
        # One worker has nothing to average, but DeepSpeed's no-ZeRO path would still flatten every
        # gradient into one buffer at each step boundary (a second full copy of the gradients, the
        # top of the memory curve) and all-reduce it with itself.
        engine.enable_backward_allreduce = False
    mixed = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
    if config.deepspeed.zero_stage == 0 and not mixed and train.logps_chunk_size:
        # Without ZeRO, in fp32, DeepSpeed reads `.grad` after backward and hooks nothing on it:
        # later micro-batches of a step may add the head's weight gradient straight into `.grad`.
        head = find_output_head(engine.module)
        if head.fused and head.head.weight.requires_grad:
            allow_grad_in_place(head.head.weight)
    return engine, scheduler


def prepare_reference(
    reference: torch.nn.Module, ds_config: dict[str, Any], zero_stage: int, device: torch.device
) -> Any:
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


@dataclass
class TrainSetup:
    """Everything `train_loop` runs with, the same on every worker."""

    config: Config
    tokenizer: Any
    engine: Any  # deepspeed.DeepSpeedEngine over the policy
    scheduler: Any  # the engine's torch LR scheduler
    reference: ReferenceSource
    layout: BatchLayout
    settings: LossSettings
    precision: str  # resolved deepspeed.precision: fp32 | bf16 | fp16
    steps: int  # optimizer steps of the run
    per_epoch: int  # optimizer steps per pass over the training split
    has_eval: bool  # eval data enough for one micro-batch per worker, and an eval strategy

    @property
    def device(self) -> torch.device:
        return self.engine.device


def build_setup(config: Config, ctx: WorkerContext) -> TrainSetup:
    """Process group, seeds, tokenizer, models, DeepSpeed engine and layout, in that order.
    Raises ValueError when the training split holds fewer pairs than one global batch."""
    train, use_gpu = config.train, config.scaling.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # read when deepspeed imports
    init_process_group(ctx, "nccl" if use_gpu else "gloo", config.scaling.timeout_s)
    seed_everything(train.seed)
    per_epoch = train.steps_per_epoch(ctx.train.num_rows, ctx.world_size)
    if per_epoch == 0:
        raise ValueError(
            f"{ctx.train.num_rows} training pairs are fewer than one global batch "
            f"({train.pairs_per_step(ctx.world_size)} = train.micro_batch_size x gradient_accumulation_steps "
            "x scaling.num_workers)"
        )
    steps = train.total_steps(ctx.train.num_rows, ctx.world_size)
    tokenizer = load_tokenizer(config.tokenizer_path(), trust_remote_code=config.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    precision = config.deepspeed.resolved_precision(use_gpu)
    if precision == "bf16" and use_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"deepspeed.precision: {config.deepspeed.precision} means bf16 on GPUs, which this GPU "
            f"({torch.cuda.get_device_name()}) does not support; set deepspeed.precision: fp16 or fp32"
        )
    ds_config = build_deepspeed_config(config, world_size=ctx.world_size)
    with zero3_loading(ds_config):
        policy = load_policy(config.policy_model(), config.lora)
        # None unless mode is model: adapter_disabled reuses the policy, precompute / precomputed
        # read the reference log-probs from the data, none has no reference, so those workers hold
        # no second model. The
        # copy loads in the policy's compute dtype (DeepSpeed casts only the engine's module), so
        # at step one both compute the same log-probs and the loss is ln 2.
        mode = config.reference_mode()
        reference = None
        if mode == "model":
            reference = load_reference(config.reference_model(), config.reference, config.lora)
    if train.disable_dropout:
        for model in (policy, reference):
            if model is not None:
                disable_dropout(model)
    engine, scheduler = build_engine(config, ctx, policy, ds_config, steps)
    if reference is not None:
        reference = prepare_reference(reference, ds_config, config.deepspeed.zero_stage, engine.device)
    micro = train.micro_batch_size
    has_eval = (
        ctx.eval is not None and ctx.eval.num_rows >= micro * ctx.world_size and train.eval_strategy != "no"
    )
    return TrainSetup(
        config=config,
        tokenizer=tokenizer,
        engine=engine,
        scheduler=scheduler,
        reference=ReferenceSource(
            mode,
            engine.module,
            reference,
            train.ld_alpha,
            train.logps_chunk_size,
        ),
        layout=build_layout(train, engine.module, reference, pad_id, config.data.max_length),
        settings=build_loss_settings(train),
        precision=precision,
        steps=steps,
        per_epoch=per_epoch,
        has_eval=has_eval,
    )
