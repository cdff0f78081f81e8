"""The one configuration tree of dpo-cluster.

A config is a YAML file loaded strictly into the dataclasses below, then patched by dotted
`key=value` overrides from the command line (`data.max_length=512`, `train.loss_type=[sigmoid,sft]`).
Unknown keys are an error that lists the valid ones; types are checked against the annotations;
cross-field rules run at load time so a bad config fails before any Ray worker starts.

Every field carries a comment with its allowed values and units. Values derived from several
fields are methods (`DataConfig.format_spec()`), never stored twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

if typing.TYPE_CHECKING:
    from dpo_cluster.data.formats import FormatSpec
    from dpo_cluster.data.tokenize import TokenizeSpec


# The divergences `dpo_cluster.losses` implements (checked equal there by the tests), named here so
# that loading a config needs no torch.
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


@dataclass
class SourceConfig:
    """Where one split's rows come from. In YAML a plain string is shorthand for `{path: ...}`."""

    # A local file (.jsonl/.json/.parquet/.csv), a directory of such files, a glob
    # ("data/*.jsonl"), a directory written by `datasets.save_to_disk`, or a Hugging Face hub
    # dataset id ("lvwerra/stack-exchange-paired"). A path that exists locally is always local.
    path: str | None = None
    # Hub and save_to_disk only: the split to load ("train", "test", "train[:10%]").
    split: str = "train"
    # Hub only: the dataset configuration name (load_dataset's `name`).
    subset: str | None = None
    # Hub only: a sub-directory of the dataset repo (stack-exchange-paired uses "data/rl").
    data_dir: str | None = None
    # Hub only: a git revision (tag, branch or commit) to pin the data.
    revision: str | None = None
    # Inline rows instead of a path (small examples and tests). Exactly one of path/rows.
    rows: list[Any] | None = None

    def check(self, key: str) -> None:
        if (self.path is None) == (self.rows is None):
            raise ConfigError(f"{key}: set exactly one of {key}.path or {key}.rows")

    def describe(self) -> str:
        """A short human name for messages and row ids."""
        return self.path if self.path is not None else "inline rows"


@dataclass
class ModelConfig:
    # Hugging Face hub id or local directory of the base (policy) model. Required.
    name_or_path: str = ""
    # Hub only: git revision of the model.
    revision: str | None = None
    # Allow model/tokenizer code from the hub repo to run (needed by some architectures).
    trust_remote_code: bool = False
    # Weights dtype when loading: float32 | bfloat16 | float16. DeepSpeed mixed precision is
    # deepspeed.precision; float32 here with bf16 there keeps fp32 master weights.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Attention kernel: null (transformers' default) | eager | sdpa | flash_attention_2 (GPU).
    attn_implementation: str | None = None
    # Recompute activations in backward to save memory (slower steps).
    gradient_checkpointing: bool = False
    # Gated SiLU MLPs (Llama, Qwen2, Mistral, ...) keep their gate and up projections for backward
    # and recompute silu there instead of also keeping its output: the same values, about a tenth
    # less activation memory, no extra matrix work (dpo_cluster.mlp_recompute). Other MLPs stay.
    recompute_mlp_activations: bool = True

    def check(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path: required (a hub id or a local model directory)")
        path = self.name_or_path
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            raise ConfigError(f"model.name_or_path: no such local model directory: {path}")


@dataclass
class DataConfig:
    # Training rows. Required for prepare/train.
    train: SourceConfig | None = None
    # Evaluation rows. If unset, data.eval_fraction of the train rows are held out instead.
    eval: SourceConfig | None = None
    # Row format: auto (detected per dataset from its first rows) | standard | standard_implicit |
    # conversational | conversational_implicit | sharegpt.
    format: Literal[
        "auto", "standard", "standard_implicit", "conversational", "conversational_implicit", "sharegpt"
    ] = "auto"
    # Canonical field -> column name in the data. Canonical fields: prompt, chosen, rejected,
    # system, conversations. E.g. {prompt: question, chosen: response_j, rejected: response_k}.
    columns: dict[str, str] = field(default_factory=dict)
    # Python format string building a standard prompt from columns, e.g.
    # "Question: {prompt}\n\nAnswer: " or "{context}\n\n{question}\n". null = prompt column as is.
    prompt_template: str | None = None
    # System prompt used when a row carries none (conversational: a system message; standard:
    # prepended to the prompt followed by a blank line).
    system_prompt: str | None = None
    # standard_implicit only: the prompt is the shared prefix of chosen and rejected, cut right
    # after the last occurrence of this marker.
    assistant_marker: str = "\n\nAssistant:"
    # Canonical field -> fixed value for rows lacking that field, e.g. {rejected: ""} for data
    # with an empty rejected answer.
    constants: dict[str, str] = field(default_factory=dict)
    # Tokenizer hub id or directory. null = the model's (model.name_or_path).
    tokenizer: str | None = None
    # Chat template for conversational rows: inline jinja text or a path to a .jinja file.
    # null = the tokenizer's own, or a plain "User:/Assistant:" template if it has none.
    chat_template: str | None = None
    # Tokens per sequence, prompt + completion (chosen and rejected each). >= 2.
    max_length: int = 1024
    # Tokens for the prompt alone. null = limited only by max_length - 1.
    max_prompt_length: int | None = None
    # Which end of an over-long prompt is kept: keep_end (its last tokens, the recent context)
    # | keep_start. Completions are always cut at their end.
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    # What happens to a prompt longer than its budget: drop (reason prompt_too_long) | truncate.
    prompt_overflow: Literal["drop", "truncate"] = "drop"
    # Fraction of train rows held out for eval when data.eval is unset, in [0, 1). Rows are
    # assigned by a stable hash of their prompt, so pairs sharing a prompt share a split.
    eval_fraction: float = 0.0
    # Seed mixed into the split hash; change it to draw a different held-out set.
    split_seed: int = 0
    # Defective rows (see data_report.json reasons): skip (drop and count) | fail (stop at the
    # first one, naming file, line and field).
    on_bad_row: Literal["skip", "fail"] = "skip"
    # Fail the run if more than this fraction of a split's rows are defective, in [0, 1].
    # Length-policy drops (prompt_too_long, ...) do not count.
    max_bad_fraction: float = 0.1
    # Rows per tokenization batch handed to each Ray Data actor.
    batch_size: int = 256
    # CPUs the pipeline may use at once (read + tokenize tasks). null = all the cluster offers.
    num_cpus: int | None = None
    # Reuse output_dir/prepared when its cache key (data, tokenizer, template, lengths) matches.
    cache: bool = True

    def check(self) -> None:
        if self.train is None:
            raise ConfigError("data.train: required (a path, a hub dataset id, or inline rows)")
        self.train.check("data.train")
        if self.eval is not None:
            self.eval.check("data.eval")
            if self.eval_fraction > 0:
                raise ConfigError(
                    "data.eval_fraction: must be 0 when data.eval is set (use one or the other)"
                )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_length < 2:
            raise ConfigError(
                f"data.max_length: must be >= 2 (a prompt token and a completion token), got {self.max_length}"
            )
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"data.max_prompt_length: must be in [1, data.max_length={self.max_length}), got {self.max_prompt_length}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"data.num_cpus: must be >= 1, got {self.num_cpus}")
        # The field-level rules live with the code that uses them; surface them under our keys.
        try:
            self.format_spec()
        except ValueError as e:
            raise ConfigError(f"data (format settings): {e}") from e
        try:
            self.tokenize_spec()
        except (ValueError, OSError) as e:
            raise ConfigError(f"data (tokenization settings): {e}") from e

    def format_spec(self) -> FormatSpec:
        from dpo_cluster.data.formats import FormatSpec

        return FormatSpec(
            format=self.format,
            columns=dict(self.columns),
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            assistant_marker=self.assistant_marker,
            constants=dict(self.constants),
        )

    def tokenize_spec(self) -> TokenizeSpec:
        from dpo_cluster.data.tokenize import TokenizeSpec, load_chat_template

        return TokenizeSpec(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
            prompt_overflow=self.prompt_overflow,
            chat_template=load_chat_template(self.chat_template),
        )


@dataclass
class LoraConfig:
    # Train a LoRA adapter (peft) instead of all weights.
    enabled: bool = False
    # Rank of the update matrices. >= 1.
    r: int = 16
    # Scaling numerator (the update is scaled by alpha / r).
    alpha: int = 32
    # Dropout on the LoRA input, in [0, 1).
    dropout: float = 0.05
    # Module names to adapt, or ["all-linear"] for every linear layer but the output head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # QLoRA: load the base in 4-bit (bitsandbytes). Needs CUDA GPUs.
    load_in_4bit: bool = False
    # Write final/ as a full model with the adapter merged in, instead of the adapter alone.
    merge_on_save: bool = False


@dataclass
class ReferenceConfig:
    # Where reference log-probs come from: auto (adapter_disabled with LoRA, else model) |
    # model (a frozen copy, never given an optimizer; sharded like the policy under ZeRO-3) |
    # adapter_disabled (the LoRA policy with its adapter switched off: no second copy) |
    # precompute (a Ray Data actor pool of the reference scores every train and eval pair, beside
    # training or before it, cached under output_dir/reference_logps/; the workers load none) |
    # precomputed (ref_chosen_logps / ref_rejected_logps columns in the data: none loaded).
    mode: Literal["auto", "model", "adapter_disabled", "precompute", "precomputed"] = "auto"
    # A different reference model (mode: model or precompute): hub id or local directory.
    # null = the policy's starting weights (model.name_or_path at model.revision; with LoRA the
    # base model without the adapter, which is what the LoRA policy starts as).
    name_or_path: str | None = None
    # The fields below are for mode: precompute only.
    # Reference actors scoring at once (the actor pool's size), >= 1; each holds one reference copy.
    concurrency: int = 1
    # Pairs per reference forward, >= 1 (each pair is two sequences, so 2 x batch_size rows).
    batch_size: int = 8
    # GPUs per actor, >= 0: 0 scores on CPU; a fraction (0.5) packs several actors on one GPU.
    num_gpus: float = 0.0
    # CPUs per actor, >= 0; fractions allowed. Ray sets the actor's OMP_NUM_THREADS from it (>= 1).
    num_cpus: float = 1.0
    # Ray accelerator type the actors' GPUs must be (e.g. L4, A10G, T4), so scoring can run on
    # cheaper devices than training. null = any GPU. Needs num_gpus > 0.
    accelerator_type: str | None = None
    # Reference weights dtype: auto (model.dtype: the values the in-loop reference would give) |
    # float32 | bfloat16 | float16 (float16 needs num_gpus > 0). Stored log-probs are float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Keep the scored pairs (Parquet) under output_dir/reference_logps/<cache key>/ and reuse them
    # when a later run has the same key; false scores every run and writes nothing.
    cache: bool = True
    # Score while the workers train (they read pairs as they are scored) where the cluster has
    # room for the actors beside the training workers; otherwise, or when false, score everything
    # first. See dpo_cluster.data.reference_stream.
    overlap: bool = True

    def resolved_mode(self, lora: bool) -> str:
        if self.mode == "auto":
            return "adapter_disabled" if lora else "model"
        return self.mode

    def resolved_dtype(self, model_dtype: str) -> str:
        """The dtype the precompute actors load the reference in."""
        return model_dtype if self.dtype == "auto" else self.dtype

    def check(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"reference.concurrency: must be >= 1, got {self.concurrency}")
        if self.batch_size < 1:
            raise ConfigError(f"reference.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError(
                f"reference.num_gpus, reference.num_cpus: must be >= 0, got {self.num_gpus}, {self.num_cpus}"
            )
        if self.accelerator_type is not None and self.num_gpus == 0:
            raise ConfigError("reference.accelerator_type: set, but reference.num_gpus is 0 (CPU actors)")
        if self.dtype == "float16" and self.num_gpus == 0:
            raise ConfigError("reference.dtype: float16 needs GPU actors (reference.num_gpus > 0)")
        path = self.name_or_path
        # Spelled as a path (not a hub id, which is checked when it loads): a missing one is a
        # mistake to report now.
        looks_local = path is not None and path.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(str(path)).expanduser().is_dir():
            raise ConfigError(f"reference.name_or_path: no such local model directory: {path}")


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 (plain data parallel) | 1 (shard optimizer state) | 2 (+ gradients) | 3 (+ weights).
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Keep optimizer state (stage >= 1) / parameters (stage 3) in CPU memory: none | cpu.
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    # Mixed precision: auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Raw DeepSpeed config merged last (nested keys merge), the escape hatch for anything else.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    # DPO loss type(s); a list combines several with train.loss_weights. See dpo_cluster.losses.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    # One weight per loss type. null = 1.0 each.
    loss_weights: list[float] | None = None
    # Temperature of the implicit reward beta * log(pi/pi_ref) (Rafailov et al. 2023). > 0.
    beta: float = 0.1
    # Label smoothing (conservative DPO) for robust, exo_pair, aot, aot_unpaired; in [0, 0.5).
    label_smoothing: float = 0.0
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
    # data.max_length tokens (>= 2 x data.max_length). See dpo_cluster.train.token_budget.
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
        from dpo_cluster.losses import LOSS_FUNCTIONS

        if self.beta <= 0:
            raise ConfigError(f"train.beta: must be > 0, got {self.beta}")
        if not self.loss_type:
            raise ConfigError("train.loss_type: at least one loss type is required")
        for name in self.loss_type:
            if name not in LOSS_FUNCTIONS:
                raise ConfigError(
                    f"train.loss_type: unknown loss {name!r}; valid: {', '.join(LOSS_FUNCTIONS)}"
                )
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
        if self.f_alpha_divergence_coef <= 0:
            raise ConfigError(f"train.f_alpha_divergence_coef: must be > 0, got {self.f_alpha_divergence_coef}")
        if self.discopop_tau <= 0:
            raise ConfigError(f"train.discopop_tau: must be > 0, got {self.discopop_tau}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"train.ld_alpha: must be in [0, 1] or null, got {self.ld_alpha}")
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

    def check(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")


@dataclass
class ServeConfig:
    # The base model: hub id, local directory or builtin name. null = model.name_or_path.
    base: str | None = None
    # The tuned model: a training run's final/ (full model or LoRA adapter), a hub id or a
    # directory. null = output_dir/final. An adapter is served over the base's weights (one copy).
    tuned: str | None = None
    # HTTP address of Ray Serve's proxy. 127.0.0.1 keeps it local; 0.0.0.0 listens on every
    # interface (put an API key on it).
    host: str = "127.0.0.1"
    port: int = 8000
    # Generation device: null (cuda when a GPU is visible, else cpu) | cpu | cuda.
    device: str | None = None
    # Weights dtype for serving: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # API key for generation, compare, arena battle/vote and export routes, read from this
    # environment variable, or (api_key_file) from a file such as a mounted Kubernetes Secret.
    # Neither set or both empty: no key is asked for (fine on 127.0.0.1 only).
    api_key_env: str = "DPO_CLUSTER_API_KEY"
    api_key_file: str | None = None
    # SQLite file of arena battles and votes. null = output_dir/arena/votes.sqlite.
    arena_db: str | None = None
    # Limits on each request: prompt tokens (after the chat template), the max_new_tokens a client
    # may ask for, the default when it asks for none, the request body in bytes.
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    default_max_new_tokens: int = 128
    max_body_bytes: int = 65536
    # Seconds a generation may take before the client gets 504 (the row stops generating too).
    request_timeout_s: float = 60.0
    # Dynamic batching on each model replica (@serve.batch): most requests per batch, and seconds
    # to wait for a batch to fill.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    # Requests a model replica takes at once (Serve queues the rest). >= max_batch_size.
    max_ongoing_requests: int = 32
    # Model replicas: fixed at min_replicas, or autoscaled between min_replicas and max_replicas
    # to keep target_ongoing_requests per replica when max_replicas > min_replicas.
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    # Resources per model replica (GPUs may be fractional to pack both models on one GPU).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Replicas of the HTTP front (routes, arena); they share arena_db, so keep them on one node.
    ingress_replicas: int = 1
    # Serve health checks: how often, and how long a check may take before the replica restarts.
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0

    def check(self) -> None:
        positive = {
            "port": self.port,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "default_max_new_tokens": self.default_max_new_tokens,
            "max_body_bytes": self.max_body_bytes,
            "request_timeout_s": self.request_timeout_s,
            "max_batch_size": self.max_batch_size,
            "max_ongoing_requests": self.max_ongoing_requests,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "ingress_replicas": self.ingress_replicas,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"serve.{name}: must be > 0, got {value}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"serve.default_max_new_tokens: {self.default_max_new_tokens} is over the cap "
                f"serve.max_new_tokens ({self.max_new_tokens})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"serve.max_ongoing_requests: must be >= serve.max_batch_size ({self.max_batch_size}), "
                "or batches can never fill"
            )
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"serve.max_replicas: {self.max_replicas} is below serve.min_replicas ({self.min_replicas})"
            )
        if self.batch_wait_timeout_s < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("serve.batch_wait_timeout_s, serve.num_cpus, serve.num_gpus: must be >= 0")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"serve.device: null, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class EvalConfig:
    """`dpo-cluster eval`: held-out reward accuracy of tuned vs base, and tuned-vs-base win rate."""

    # The tuned model: a training run's final/ (full model or LoRA adapter directory) or a hub id.
    # null = output_dir/final.
    tuned: str | None = None
    # The base model, which is also the DPO reference. null = model.name_or_path.
    base: str | None = None
    # Prompts for the win rate: a .jsonl or .json file of rows with a "prompt" (a string or a
    # message list; preference rows are fine, their chosen/rejected are ignored).
    # null = the prompts of the data's eval split (data.eval or data.eval_fraction).
    prompts: str | None = None
    # How many prompts (the first N, in file order; identical prompts count once). >= 1.
    num_prompts: int = 64
    # Sampling, the same for base and tuned: tokens per answer (>= 1), temperature (0 = greedy,
    # else > 0), nucleus top_p in (0, 1], and the seed (prompt i is sampled with seed + i).
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # Who decides which answer is better: rule (evaluation.rule or evaluation.pattern) |
    # reward_model (evaluation.reward_model scores both) | arena (the votes in evaluation.arena_db;
    # nothing is generated).
    judge: Literal["rule", "reward_model", "arena"] = "rule"
    # Judge rule: a named rule, title_length (30-75 characters on one line,
    # dpo_cluster.data.samples.is_good_title) ...
    rule: str | None = None
    # ... or a regular expression (Python re, searched anywhere in the answer). Set one of the two.
    pattern: str | None = None
    # An answer passes when the pattern is found (true) or when it is not found (false).
    pattern_must_match: bool = True
    # Judge reward_model: a directory or hub id of an AutoModelForSequenceClassification with
    # num_labels 1 and its tokenizer.
    reward_model: str | None = None
    # Judge arena: the arena's SQLite file. null = the serve app's (serve.arena_db, else
    # output_dir/arena/votes.sqlite).
    arena_db: str | None = None
    # Prompts per generation batch (each gives two rows, base and tuned), and pairs per log-prob
    # batch. >= 1. Lower it for long sequences or large vocabularies.
    batch_size: int = 16
    # Held-out pairs scored for reward accuracy (the first N of the eval split). null = all.
    max_pairs: int | None = None
    # Device for generation and log-probs: null (cuda when a GPU is visible, else cpu) | cpu |
    # cuda | cuda:N.
    device: str | None = None
    # Weights dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the JSON report goes. null = output_dir/eval_report.json.
    output: str | None = None

    def check(self) -> None:
        """Each field on its own, and pairs of fields that are both set. What a run additionally
        needs (a judge's own setting, a prompt source) is `check_ready`, since every command
        loads this section and only `eval` uses it."""
        import re

        from dpo_cluster.evaluation.judges import RULES

        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"evaluation.max_pairs: must be >= 1 or null, got {self.max_pairs}")
        if self.temperature < 0:
            raise ConfigError(f"evaluation.temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"evaluation.top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"evaluation.seed: must be in [0, 2**63), got {self.seed}")
        if self.rule is not None and self.rule not in RULES:
            raise ConfigError(f"evaluation.rule: unknown rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.rule is not None and self.pattern is not None:
            raise ConfigError("evaluation.pattern: set together with evaluation.rule; set one of the two")
        if self.pattern is not None:
            if not self.pattern:
                raise ConfigError("evaluation.pattern: must not be empty")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"evaluation.pattern: not a valid regular expression: {e}") from e
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"evaluation.device: null, cpu, cuda or cuda:N, got {self.device!r}")
        if self.prompts is not None and not Path(self.prompts).expanduser().is_file():
            raise ConfigError(f"evaluation.prompts: no such file: {self.prompts}")
        for name in ("reward_model", "tuned", "base"):
            value = getattr(self, name)
            # Spelled as a path (not a hub id): a missing one is a mistake to report now.
            looks_local = value is not None and value.startswith(("/", "./", "../", "~"))
            if looks_local and not Path(value).expanduser().exists():
                raise ConfigError(f"evaluation.{name}: no such file or directory: {value}")

    def check_ready(self, has_eval_split: bool) -> None:
        """What `dpo-cluster eval` needs beyond `check`: the judge's own setting, and prompts
        (a file, or an eval split to take them from). Raises ConfigError naming the key."""
        from dpo_cluster.evaluation.judges import RULES

        if self.judge == "rule" and self.rule is None and self.pattern is None:
            raise ConfigError(
                "evaluation.judge: rule needs evaluation.rule "
                f"({', '.join(RULES)}) or evaluation.pattern (a regular expression)"
            )
        if self.judge == "reward_model" and not self.reward_model:
            raise ConfigError(
                "evaluation.judge: reward_model needs evaluation.reward_model (a sequence-classification "
                "model directory or hub id)"
            )
        if self.judge != "arena" and self.prompts is None and not has_eval_split:
            raise ConfigError(
                "evaluation.prompts: required when the data has no eval split (set evaluation.prompts, "
                "data.eval or data.eval_fraction)"
            )


@dataclass
class Config:
    # Directory for everything a run writes: data_report.json, prepared/, metrics, final/.
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required (the directory this run writes to)")
        self.model.check()
        self.data.check()
        self.scaling.check()
        self.train.check(self.scaling.num_workers)
        self.serve.check()
        self.evaluation.check()
        self._check_cross_sections()

    def check_serving(self) -> None:
        """The checks that matter to `dpo-cluster serve`: a base and a tuned model must be named
        (directly, or through model.name_or_path and output_dir), and the serve section valid.
        Training-only sections keep their defaults' validity, so they are not re-checked."""
        if not (self.serve.base or self.model.name_or_path):
            raise ConfigError("serve.base: required (or model.name_or_path): the base model to serve")
        if not (self.serve.tuned or self.output_dir):
            raise ConfigError("serve.tuned: required (or output_dir, whose final/ is the tuned model)")
        self.serve.check()

    def serve_base(self) -> str:
        return self.serve.base or self.model.name_or_path

    def serve_tuned(self) -> str:
        return self.serve.tuned or str(Path(self.output_dir) / "final")

    def arena_db(self) -> str:
        if self.serve.arena_db:
            return self.serve.arena_db
        return str(Path(self.output_dir or ".") / "arena" / "votes.sqlite")

    def _check_cross_sections(self) -> None:
        lora_defaults = LoraConfig()
        if not self.lora.enabled:
            changed = [
                f.name
                for f in dataclasses.fields(LoraConfig)
                if f.name != "enabled" and getattr(self.lora, f.name) != getattr(lora_defaults, f.name)
            ]
            if changed:
                raise ConfigError(
                    f"lora.{changed[0]}: set, but lora.enabled is false (enable LoRA or remove it)"
                )
        if self.lora.load_in_4bit and not self.scaling.use_gpu:
            raise ConfigError(
                "lora.load_in_4bit: QLoRA needs CUDA GPUs (scaling.use_gpu: true); on CPU use plain LoRA"
            )
        budget = self.train.max_tokens_per_micro_batch
        if budget is not None and budget < 2 * self.data.max_length:
            raise ConfigError(
                f"train.max_tokens_per_micro_batch: {budget} cannot hold one pair of data.max_length="
                f"{self.data.max_length} tokens (chosen and rejected); set it to at least {2 * self.data.max_length}"
            )
        mode = self.reference.resolved_mode(self.lora.enabled)
        if mode == "adapter_disabled" and not self.lora.enabled:
            raise ConfigError("reference.mode: adapter_disabled needs lora.enabled: true")
        if self.reference.name_or_path is not None and mode not in ("model", "precompute"):
            raise ConfigError(
                f"reference.name_or_path: only used with reference.mode: model or precompute (mode is {mode})"
            )
        self.reference.check()
        if mode != "precompute":
            reference_defaults = ReferenceConfig()
            changed = [
                f.name
                for f in dataclasses.fields(ReferenceConfig)
                if f.name not in ("mode", "name_or_path")
                and getattr(self.reference, f.name) != getattr(reference_defaults, f.name)
            ]
            if changed:
                raise ConfigError(
                    f"reference.{changed[0]}: only used with reference.mode: precompute (mode is {mode})"
                )
        elif self.lora.load_in_4bit and self.reference.num_gpus == 0:
            # The LoRA policy's reference is its 4-bit base; the actors load that same quantized
            # base, which bitsandbytes can only do on a CUDA GPU.
            raise ConfigError(
                "reference.num_gpus: precompute with lora.load_in_4bit loads the 4-bit base on the "
                "actors' GPUs; set reference.num_gpus > 0"
            )
        if self.deepspeed.offload_params != "none" and self.deepspeed.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params: parameter offload needs deepspeed.zero_stage: 3")
        if self.deepspeed.offload_optimizer != "none" and self.deepspeed.zero_stage == 0:
            raise ConfigError(
                "deepspeed.offload_optimizer: optimizer offload needs deepspeed.zero_stage >= 1"
            )
        if not self.scaling.use_gpu and self.deepspeed.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 needs GPUs; use fp32 or bf16 on CPU")

    def tokenizer_path(self) -> str:
        return self.data.tokenizer or self.model.name_or_path

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute. Ray Train runs each worker in a working directory
        of its own, so a relative output_dir or model path would resolve somewhere else there.
        Hub ids and URIs (s3://...) are left as they are."""

        def existing(value: str | None) -> str | None:
            if value is None or "://" in value or not Path(value).expanduser().exists():
                return value
            return str(Path(value).expanduser().resolve())

        def always(value: str | None) -> str | None:
            if value is None or "://" in value:
                return value
            return str(Path(value).expanduser().resolve())

        return dataclasses.replace(
            self,
            output_dir=always(self.output_dir) or "",
            model=dataclasses.replace(self.model, name_or_path=existing(self.model.name_or_path) or ""),
            data=dataclasses.replace(self.data, tokenizer=existing(self.data.tokenizer)),
            reference=dataclasses.replace(self.reference, name_or_path=existing(self.reference.name_or_path)),
            train=dataclasses.replace(self.train, resume_from=existing(self.train.resume_from)),
            scaling=dataclasses.replace(self.scaling, storage_path=always(self.scaling.storage_path)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> typed dataclasses -> cross-field checks.


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, serving: bool = False
) -> Config:
    """Load a YAML config (or start from defaults), apply `key=value` overrides, type-check and
    validate (`Config.check`, or `Config.check_serving` when serving). Raises ConfigError naming
    the offending key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides or []:
        apply_override(raw, item)
    config = build_dataclass(Config, raw, "")
    if serving:
        config.check_serving()
    else:
        config.check()
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, null, [lists]),
    falling back to the literal string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML (a template with a lone brace, say): take it as the string typed
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and _field_type_at(parts[: depth + 1]) is SourceConfig:
            child = {"path": child}  # the string shorthand gains a sibling key
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def valid_keys(cls: type) -> list[str]:
    """All dotted keys of a config dataclass, for error messages and docs."""
    keys: list[str] = []
    for name, hint in typing.get_type_hints(cls).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            keys.extend(f"{name}.{sub}" for sub in valid_keys(inner))
        else:
            keys.append(name)
    return keys


def build_dataclass(cls: type, value: Any, key: str) -> Any:
    """Build `cls` from a mapping, recursively, rejecting unknown keys and wrong types."""
    if cls is SourceConfig and isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {_type_name(value)}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in value if k not in hints]
    if unknown:
        prefix = f"{key}." if key else ""
        valid = [f"{prefix}{k}" for k in valid_keys(cls)]
        close = difflib.get_close_matches(f"{prefix}{unknown[0]}", valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}{hint}; valid keys: " + ", ".join(valid))
    kwargs = {}
    for name, hint in hints.items():
        if name in value:
            kwargs[name] = _coerce(hint, value[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {_type_name(value)} fits none of its types"
        )
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans; map back to the option spelled that way.
            spelled = [
                a
                for a in args
                if isinstance(a, str)
                and a.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))
            ]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if origin is list:
        (item_type,) = args
        if isinstance(value, str) and item_type is str:
            value = [value]  # `loss_type: sigmoid` means [sigmoid]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_type_name(value)}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_type_name(value)}")
        return {_coerce(key_type, k, key): _coerce(item_type, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-6 without a dot as a string; it is meant as a number.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _field_type_at(parts: list[str]) -> type | None:
    cls: type | None = Config
    for part in parts:
        if cls is None:
            return None
        hint = typing.get_type_hints(cls).get(part)
        cls = _dataclass_in(hint) if hint is not None else None
    return cls


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
