"""The `train`, `deepspeed` and `scaling` sections: the optimization, its engine, its workers.

Loss and divergence names are checked against the tuples below, not `dpo_cluster.losses`
itself, so that loading a config needs no torch; the tests keep the two equal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpo_cluster.config.loader import ConfigError

# The loss types `dpo_cluster.losses.LOSS_FUNCTIONS` implements, in its order.
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

# The reference-free loss types (`dpo_cluster.losses.REFERENCE_FREE_LOSS_FUNCTIONS`): they read no
# reference log-probs, so they go with `reference.mode: none` (what `auto` resolves to for them),
# and each combines only with sft.
REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = ("cpo", "simpo", "orpo")

# The loss types over unpaired examples (`dpo_cluster.losses.kto`): each row is one completion
# with a label (data.format unpaired, or pairs split into a desirable and an undesirable example).
UNPAIRED_LOSS_TYPES: tuple[str, ...] = ("kto",)

# The divergences `dpo_cluster.losses` implements.
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types with an f-divergence form (`losses.F_DIVERGENCE_LOSS_TYPES`), and those that sort
# across the batch and so take no per-pair WPO weights (`losses.BATCH_SORTED_LOSS_TYPES`).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
BATCH_SORTED_LOSS_TYPES = ("aot", "aot_unpaired")


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 (plain data parallel) | 1 (shard optimizer state) | 2 (+ gradients) | 3 (+ weights).
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Keep optimizer state (stage >= 1) / parameters (stage 3) in CPU memory: none | cpu.
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    # Mixed precision: auto (bf16 on GPUs, fp32 on CPU) | fp32 | bf16 | fp16. The forward of the
    # policy and of every reference mode runs in it (`Config.compute_dtype`).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Raw DeepSpeed config merged last (nested keys merge), the escape hatch for anything else.
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolved_precision(self, use_gpu: bool) -> str:
        """fp32 | bf16 | fp16: "auto" is bf16 on GPU workers and fp32 on CPU ones. Decided from the
        config alone, so the driver (which may have no GPU) and the workers agree on it; a GPU
        without bf16 is refused by the worker (`dpo_cluster.train.setup`)."""
        if self.precision == "auto":
            return "bf16" if use_gpu else "fp32"
        return self.precision


@dataclass
class TrainConfig:
    # Loss type(s); a list combines several with train.loss_weights. See dpo_cluster.losses.
    # DPO family (needs a reference): sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard
    # aot aot_unpaired apo_zero apo_down discopop sft sigmoid_norm. Reference-free (reference.mode
    # none; each alone or with sft): cpo (CPO: sigmoid on summed log-probs + cpo_alpha x NLL),
    # simpo (SimPO: length-averaged log-probs, margin simpo_gamma), orpo (ORPO: NLL + beta x odds-ratio
    # term). TRL's CPO-SimPO (cpo_alpha > 0) is [simpo, sft] with loss_weights [1, cpo_alpha].
    # Unpaired (needs a reference in the loop; alone): kto (KTO over labelled completions, with the
    # KL reference point estimated from mismatched prompt/completion pairs of each micro-batch).
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    # One weight per loss type. null = 1.0 each.
    loss_weights: list[float] | None = None
    # Temperature of the implicit reward beta * log(pi/pi_ref) (Rafailov et al. 2023). > 0. For cpo
    # and simpo the temperature of the policy's own scores (SimPO's paper uses 2 to 10); for orpo
    # the paper's lambda, the weight of the odds-ratio term (TRL's ORPOConfig.beta too).
    beta: float = 0.1
    # Label smoothing (conservative DPO) for robust, exo_pair, aot, aot_unpaired, cpo, simpo; in [0, 0.5).
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (reward units, i.e. beta x per-token log-prob), >= 0.
    simpo_gamma: float = 0.5
    # Weight of cpo's NLL (behaviour cloning) term on the chosen answers, >= 0 (0: no NLL term).
    cpo_alpha: float = 1.0
    # KTO's weights of the desirable (lambda_D) and undesirable (lambda_U) examples' losses, > 0.
    # With unbalanced data the paper (eq. 8) keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # TR-DPO (Gorbatovski et al. 2024): move the in-loop reference toward the policy every
    # ref_model_sync_steps optimizer steps, ref = alpha * policy + (1 - alpha) * ref (TRL's
    # sync_ref_model). Needs reference.mode model (a frozen copy; not precompute, precomputed,
    # adapter_disabled or none) and no LoRA. Checkpoints then hold the reference too.
    sync_ref_model: bool = False
    # The alpha of the soft update, in (0, 1]; 1 copies the policy.
    ref_model_mixup_alpha: float = 0.6
    # Optimizer steps between updates (the paper's tau), >= 1.
    ref_model_sync_steps: int = 512
    # Divergence behind the implicit reward's log-ratio (f-DPO, Wang et al. 2023): reverse_kl (DPO) |
    # forward_kl | js_divergence | alpha_divergence. Used by sigmoid, hinge, ipo, exo_pair, robust,
    # discopop (TRL's f_divergence_type).
    f_divergence_type: str = "reverse_kl"
    # The alpha of alpha_divergence; > 0 (1 is the reverse KL limit).
    f_alpha_divergence_coef: float = 0.5
    # Temperature of discopop's log-ratio modulation; > 0.
    discopop_tau: float = 0.05
    # Weight each pair by the policy's own probability of it (WPO, Zhou et al. 2024); TRL's use_weighting.
    use_weighting: bool = False
    # Length-desensitised DPO (LD-DPO, Liu et al. 2024): the longer answer's tokens past the shorter
    # one's length count alpha times, for policy and reference alike; in [0, 1]. null = off.
    ld_alpha: float | None = None
    # Completion tokens per call of the output head when log-probs are computed from the final
    # hidden states (policy, in-loop reference, precompute, evaluation): prompt positions never meet
    # the head. A plain linear head also tiles the vocabulary (at most 2^24 logits a block, whatever
    # the chunk); another head (LoRA-adapted, ZeRO-3) holds one (tokens, vocabulary) chunk at a
    # time, recomputed in backward (under ZeRO-3 kept for it).
    # >= 0; 0 = from the model's full (2B, T, V) logits. See dpo_cluster.batch.hidden_logps.
    logps_chunk_size: int = 512
    # Peak learning rate of AdamW.
    learning_rate: float = 1e-6
    # linear | cosine (decay to 0 after warmup) | constant (after warmup).
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    # Warmup as a fraction of all optimizer steps, in [0, 1).
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_epsilon: float = 1e-8
    # Clip the global gradient norm to this; 0 = no clipping.
    max_grad_norm: float = 1.0
    # Pairs per worker per forward/backward (each pair is two sequences). >= 1.
    micro_batch_size: int = 4
    # Micro batches per optimizer step. >= 1.
    gradient_accumulation_steps: int = 1
    # Pairs per optimizer step over all workers; if set it must equal
    # micro_batch_size * gradient_accumulation_steps * scaling.num_workers.
    global_batch_size: int | None = None
    # Pack the 2B sequences of a micro-batch into rows without padding (position ids restart per
    # sequence, attention never crosses sequences; same pairs, same loss): true | false. Needs
    # transformers' own modeling code with attention eager, sdpa (block-diagonal masks) or
    # flash_attention_2/3 (varlen kernels); otherwise the run logs why and falls back to padded
    # micro-batches grouped by length. See dpo_cluster.batch.packing.
    packing: bool = False
    # Tokens per packed row, >= 2 (raised to the micro-batch's longest sequence, which is never
    # split). null = that longest sequence rounded up to a multiple of 8 (eager, sdpa: a row costs
    # no more attention than a padded row), or one row for the whole micro-batch (flash_attention_*).
    packing_row_tokens: int | None = None
    # Sort pairs by length within windows of consecutive micro-batches and re-cut them, so each
    # micro-batch holds similar lengths (less padding) while the epoch order stays random: true | false.
    # Changes which pairs share a micro-batch and an optimizer step (deterministically, identically
    # on every worker).
    group_by_length: bool = False
    # Micro-batches of the global stream (all workers) per length-grouping window, >= 1. Larger
    # windows group lengths more tightly; 1 leaves every micro-batch's pairs as they are.
    length_group_window: int = 64
    # Cut each optimizer step's pairs into forward passes of at most this many tokens (the input
    # tensor, padding included: 2B x longest sequence when padded, rows x width when packed) instead
    # of micro_batch_size pairs each, longest pairs first, so every forward costs about the same
    # memory. The step keeps its micro_batch_size x gradient_accumulation_steps x num_workers pairs
    # and the gradient stays their mean. null = fixed micro-batches. Must hold a pair of
    # data.max_length tokens (>= 2 x data.max_length). See dpo_cluster.batch.token_budget.
    max_tokens_per_micro_batch: int | None = None
    # Passes over the training data.
    num_epochs: float = 1.0
    # Stop after this many optimizer steps (null = run num_epochs).
    max_steps: int | None = None
    # Shuffle the training pairs every epoch (seeded); false keeps the prepared order.
    shuffle: bool = True
    # Seeds model init noise, dropout, data order and the split; same seed, same run on CPU.
    seed: int = 42
    # Set every dropout probability to 0 in policy and reference (as TRL does by default), so the
    # first-step reward is exactly 0 and log-prob differences carry no dropout noise.
    disable_dropout: bool = True
    # Log metrics every N optimizer steps (and at the last step).
    logging_steps: int = 10
    # Evaluate: steps (every eval_steps) | epoch (end of each epoch) | no. Always also at the end.
    eval_strategy: Literal["steps", "epoch", "no"] = "epoch"
    eval_steps: int = 100
    # Checkpoint: steps (every save_steps) | epoch | no. The final model is written regardless.
    save_strategy: Literal["steps", "epoch", "no"] = "epoch"
    save_steps: int = 500
    # Checkpoints kept (the best one by best_metric is never deleted first).
    num_checkpoints_to_keep: int = 2
    # Metric that ranks checkpoints, and whether lower or higher is better.
    best_metric: str = "eval_loss"
    best_mode: Literal["min", "max"] = "min"
    # Write final/ from the best checkpoint instead of the last step.
    load_best_at_end: bool = False
    # A checkpoint directory to continue from (a stopped run's output_dir/checkpoints/...).
    resume_from: str | None = None
    # Worker failures tolerated; the run restarts from its last checkpoint each time.
    max_failures: int = 0

    def check(self, num_workers: int) -> None:
        self._check_loss()
        self._check_optimization(num_workers)

    def _check_loss(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"train.beta: must be > 0, got {self.beta}")
        if not self.loss_type:
            raise ConfigError("train.loss_type: at least one loss type is required")
        valid = LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES + UNPAIRED_LOSS_TYPES
        for name in self.loss_type:
            if name not in valid:
                raise ConfigError(f"train.loss_type: unknown loss {name!r}; valid: {', '.join(valid)}")
        self._check_reference_free()
        self._check_unpaired()
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"train.loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"train.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ConfigError(
                f"train.f_divergence_type: unknown divergence {self.f_divergence_type!r}; "
                f"valid: {', '.join(F_DIVERGENCE_TYPES)}"
            )
        no_f_form = [name for name in self.loss_type if name not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and no_f_form:
            raise ConfigError(
                f"train.f_divergence_type: {self.f_divergence_type} applies only to "
                f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; train.loss_type {', '.join(no_f_form)} has no f-divergence form"
            )
        sorted_types = [name for name in self.loss_type if name in BATCH_SORTED_LOSS_TYPES]
        if self.use_weighting and sorted_types:
            raise ConfigError(
                f"train.use_weighting: per-pair weights cannot be used with {', '.join(sorted_types)}, "
                "which sort across the batch"
            )
        if self.f_alpha_divergence_coef <= 0:
            raise ConfigError(
                f"train.f_alpha_divergence_coef: must be > 0, got {self.f_alpha_divergence_coef}"
            )
        if self.discopop_tau <= 0:
            raise ConfigError(f"train.discopop_tau: must be > 0, got {self.discopop_tau}")
        if self.simpo_gamma < 0:
            raise ConfigError(f"train.simpo_gamma: must be >= 0, got {self.simpo_gamma}")
        if self.cpo_alpha < 0:
            raise ConfigError(f"train.cpo_alpha: must be >= 0, got {self.cpo_alpha}")
        self._check_sync_ref_model()
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"train.ld_alpha: must be in [0, 1] or null, got {self.ld_alpha}")
        if self.logps_chunk_size < 0:
            raise ConfigError(
                f"train.logps_chunk_size: must be >= 0 (0: from full logits), got {self.logps_chunk_size}"
            )

    def reference_free(self) -> bool:
        """Whether the loss reads no reference log-probs (it holds cpo, simpo or orpo)."""
        return any(name in REFERENCE_FREE_LOSS_TYPES for name in self.loss_type)

    def _check_reference_free(self) -> None:
        free = [name for name in self.loss_type if name in REFERENCE_FREE_LOSS_TYPES]
        if not free:
            return
        others = [name for name in self.loss_type if name not in REFERENCE_FREE_LOSS_TYPES and name != "sft"]
        if len(free) > 1 or others:
            raise ConfigError(
                f"train.loss_type: the reference-free {free[0]} combines only with sft (its rewards are "
                f"the policy's own scores, not log-ratios against a reference); got {', '.join(self.loss_type)}"
            )
        for name, on in (("use_weighting", self.use_weighting), ("ld_alpha", self.ld_alpha is not None)):
            if on:
                raise ConfigError(f"train.{name}: not used by the reference-free train.loss_type {free[0]}")

    def unpaired(self) -> bool:
        """Whether the loss trains on labelled completions rather than pairs (kto)."""
        return any(name in UNPAIRED_LOSS_TYPES for name in self.loss_type)

    def _check_unpaired(self) -> None:
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        if not self.unpaired():
            return
        if len(self.loss_type) > 1:
            raise ConfigError(
                f"train.loss_type: kto trains on unpaired examples and combines with no other loss; "
                f"got {', '.join(self.loss_type)}"
            )
        for name, on in (
            ("use_weighting", self.use_weighting),
            ("ld_alpha", self.ld_alpha is not None),
            ("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch is not None),
        ):
            if on:
                raise ConfigError(f"train.{name}: not supported with train.loss_type kto")
        if self.micro_batch_size < 2:
            raise ConfigError(
                "train.micro_batch_size: kto needs >= 2 (its KL estimate pairs each prompt with "
                f"another example's completion of the same micro-batch), got {self.micro_batch_size}"
            )

    def _check_sync_ref_model(self) -> None:
        defaults = TrainConfig()
        for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if not self.sync_ref_model and getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"train.{name}: set, but train.sync_ref_model is false")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(
                f"train.ref_model_mixup_alpha: must be in (0, 1], got {self.ref_model_mixup_alpha}"
            )
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"train.ref_model_sync_steps: must be >= 1, got {self.ref_model_sync_steps}")

    def _check_optimization(self, num_workers: int) -> None:
        for name in ("learning_rate", "num_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        for name in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "num_checkpoints_to_keep",
            "length_group_window",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.packing_row_tokens is not None:
            if not self.packing:
                raise ConfigError("train.packing_row_tokens: set, but train.packing is false")
            if self.packing_row_tokens < 2:
                raise ConfigError(f"train.packing_row_tokens: must be >= 2, got {self.packing_row_tokens}")
        window_default = next(f.default for f in dataclasses.fields(self) if f.name == "length_group_window")
        if self.length_group_window != window_default and not (self.group_by_length or self.packing):
            # With packing on, the window is used by the padded fallback (see dpo_cluster.batch.packing).
            raise ConfigError(
                "train.length_group_window: set, but neither train.group_by_length nor train.packing is true"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas: two numbers in [0, 1), got {self.adam_betas}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        global_batch = self.micro_batch_size * self.gradient_accumulation_steps * num_workers
        if self.global_batch_size is not None and self.global_batch_size != global_batch:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} != train.micro_batch_size "
                f"({self.micro_batch_size}) x train.gradient_accumulation_steps ({self.gradient_accumulation_steps}) "
                f"x scaling.num_workers ({num_workers}) = {global_batch}"
            )
        if self.resume_from is not None and not Path(self.resume_from).is_dir():
            raise ConfigError(f"train.resume_from: no such checkpoint directory: {self.resume_from}")

    def pairs_per_step(self, num_workers: int) -> int:
        """Pairs consumed by one optimizer step over all workers."""
        return self.micro_batch_size * self.gradient_accumulation_steps * num_workers

    def steps_per_epoch(self, num_rows: int, num_workers: int) -> int:
        """Optimizer steps in one pass: full global batches only (the remainder waits for the next epoch)."""
        return num_rows // self.pairs_per_step(num_workers)

    def total_steps(self, num_rows: int, num_workers: int) -> int:
        """Optimizer steps of the run: `max_steps`, else `num_epochs` passes (at least one step)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.num_epochs * self.steps_per_epoch(num_rows, num_workers)))


@dataclass
class ScalingConfig:
    # Ray Train workers (one process each; one GPU each when use_gpu). >= 1.
    num_workers: int = 2
    # Train on GPUs (NCCL) instead of CPUs (gloo).
    use_gpu: bool = False
    # Resources each worker reserves, e.g. {CPU: 4, GPU: 1}. {} = Ray Train's default.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # Worker placement: PACK (fill a node first) | SPREAD (one per node where possible).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Where Ray Train keeps checkpoints: a path every node can reach (NFS, s3://, gs://).
    # null = output_dir/ray_results (fine on one machine).
    storage_path: str | None = None
    # Seconds a collective (all-reduce, barrier, ZeRO-3 gather) may wait for the slowest worker
    # before the run fails, > 0. Raise it where one worker can lag far behind the others (a slow
    # checkpoint write to remote storage, a first load of a large model on one node).
    timeout_s: int = 1800

    def check(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ConfigError(f"scaling.timeout_s: must be > 0 seconds, got {self.timeout_s}")
