"""The `lora` and `reference` sections: what is trained, and where reference log-probs come from.

They sit together because the reference depends on LoRA: with an adapter the reference can be
the policy with its adapter switched off, so no second copy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpo_cluster.config.loader import ConfigError
from dpo_cluster.config.model_data import check_local_model


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
    # precomputed (ref_chosen_logps / ref_rejected_logps columns in the data: none loaded) |
    # none (no reference at all: nothing loaded, scored or cached; only for the reference-free
    # train.loss_type cpo, simpo, orpo, for which auto resolves to none and every other mode is refused).
    mode: Literal["auto", "model", "adapter_disabled", "precompute", "precomputed", "none"] = "auto"
    # A different reference model (mode: model or precompute): hub id or local directory.
    # null = the policy's starting weights (model.name_or_path at model.revision; with LoRA the
    # base model without the adapter, which is what the LoRA policy starts as).
    name_or_path: str | None = None
    # The fields below are for mode: precompute only.
    # Reference actors scoring at once (the actor pool's size), >= 1; each holds one reference copy.
    concurrency: int = 1
    # Pairs per reference forward, >= 1 (each pair is two sequences, so 2 x batch_size rows); with
    # max_tokens_per_forward, the most pairs a forward may hold.
    batch_size: int = 8
    # Pack each forward's sequences into rows without padding where the reference's attention
    # supports it (as train.packing does; values unchanged, pad compute saved); else padded rows.
    packing: bool = True
    # Token budget of one reference forward (tokens of its input tensor, padding or packed rows
    # included), >= 2 x data.max_length so any pair fits: pairs are cut by what they cost, not
    # only by batch_size. null = batch_size pairs per forward. The actors hold no gradients or
    # optimizer state, so this can be several times train.max_tokens_per_micro_batch.
    max_tokens_per_forward: int | None = None
    # GPUs per actor, >= 0: 0 scores on CPU; a fraction (0.5) packs several actors on one GPU.
    num_gpus: float = 0.0
    # CPUs per actor, >= 0; fractions allowed. Ray sets the actor's OMP_NUM_THREADS from it (>= 1).
    num_cpus: float = 1.0
    # Ray accelerator type the actors' GPUs must be (e.g. L4, A10G, T4), so scoring can run on
    # cheaper devices than training. null = any GPU. Needs num_gpus > 0.
    accelerator_type: str | None = None
    # Reference weights dtype: auto (the policy's compute dtype, `Config.compute_dtype`: the
    # values the in-loop reference gives) | float32 | bfloat16 | float16 (float16 needs
    # num_gpus > 0). Stored log-probs are float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Keep the scored values (Parquet fragments by row position) under
    # output_dir/reference_logps/<cache key>/; a later run with the same key scores only the pairs
    # it needs that are not there yet. false: values live in a scratch directory removed after
    # the run.
    cache: bool = True
    # Score while the workers train (a worker waits for the pairs it needs next) where the cluster
    # has room for the actors beside the training workers; otherwise, or when false, score first.
    # Either way only the pairs the run will read are scored (eval first, then train in the order
    # training reads it). See dpo_cluster.reference.precompute.
    overlap: bool = True

    def resolved_mode(self, lora: bool, reference_free: bool = False) -> str:
        """The mode `auto` stands for: none for a reference-free loss, else adapter_disabled with
        LoRA and model without; any other mode as set."""
        if self.mode == "auto":
            if reference_free:
                return "none"
            return "adapter_disabled" if lora else "model"
        return self.mode

    def resolved_dtype(self, compute_dtype: str) -> str:
        """The dtype the reference computes in, given the policy's compute dtype."""
        return compute_dtype if self.dtype == "auto" else self.dtype

    def check(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"reference.concurrency: must be >= 1, got {self.concurrency}")
        if self.batch_size < 1:
            raise ConfigError(f"reference.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_tokens_per_forward is not None and self.max_tokens_per_forward < 2:
            raise ConfigError(
                f"reference.max_tokens_per_forward: must be >= 2, got {self.max_tokens_per_forward}"
            )
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError(
                f"reference.num_gpus, reference.num_cpus: must be >= 0, got {self.num_gpus}, {self.num_cpus}"
            )
        if self.accelerator_type is not None and self.num_gpus == 0:
            raise ConfigError("reference.accelerator_type: set, but reference.num_gpus is 0 (CPU actors)")
        if self.dtype == "float16" and self.num_gpus == 0:
            raise ConfigError("reference.dtype: float16 needs GPU actors (reference.num_gpus > 0)")
        if self.name_or_path is not None:
            check_local_model(self.name_or_path, "reference.name_or_path")
