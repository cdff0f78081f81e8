"""The DeepSpeed config JSON of a run, derived from its typed `Config` fields (batch sizes, AdamW,
ZeRO stage and offload, precision), with `deepspeed.overrides` merged last for any setting without
a field. It has no `scheduler` block: the loop hands `deepspeed.initialize` its own torch LR
schedule, so the schedule is the same whatever DeepSpeed supports. Only a dict is built here;
deepspeed is not imported.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dpo_cluster.config import Config

# DeepSpeed prints its own progress every `steps_per_print` steps; the loop logs its own metrics,
# so the interval is set past any real run length.
NEVER_PRINT_STEPS = 2**31 - 1

# ZeRO-3 sizes in elements, DeepSpeed's documented defaults written out so they show in the logged
# config and can be tuned by `deepspeed.overrides` (larger buckets: fewer, bigger collectives).
ZERO3_SETTINGS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "sub_group_size": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}

# Keys the loop also derives from `train.*` to size its data; an override of them would make the
# engine and the data loader disagree.
BATCH_KEYS: tuple[str, ...] = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)


def build_deepspeed_config(config: Config, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `config` trained on `world_size` data-parallel workers.

    Raises ValueError if `deepspeed.overrides` changes a batch size the loop derives from `train.*`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    train, ds = config.train, config.deepspeed
    use_gpu = config.scaling.use_gpu

    cpu_adam = ds.offload_optimizer == "cpu"
    optimizer_params: dict[str, Any] = {
        "lr": train.learning_rate,
        "betas": list(train.adam_betas),
        "eps": train.adam_epsilon,
        "weight_decay": train.weight_decay,
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam: nothing to compile, and it runs on
        # CPU workers too. With the optimizer offloaded, DeepSpeedCPUAdam does the step instead;
        # it JIT-builds the cpu_adam op on first use (a minute or more, then cached).
        "torch_adam": not cpu_adam,
    }
    if not cpu_adam:
        # One fused kernel per step (CPU and CUDA): the unfused step allocates temporaries the
        # size of the largest parameter, a 150k-vocabulary embedding's 0.5 GB at fp32. TRL's
        # default optimizer is the same (adamw_torch_fused).
        optimizer_params["fused"] = True

    ds_config: dict[str, Any] = {
        "train_batch_size": train.pairs_per_step(world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": _zero_section(config),
        "steps_per_print": NEVER_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }
    if train.max_grad_norm > 0:
        ds_config["gradient_clipping"] = train.max_grad_norm

    precision = ds.resolved_precision(use_gpu)
    if precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # loss_scale 0 = dynamic loss scaling, starting at 2**16 and halving on overflow.
        ds_config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}

    changed = [key for key in BATCH_KEYS if key in ds.overrides and ds.overrides[key] != ds_config[key]]
    if changed:
        raise ValueError(
            f"deepspeed.overrides.{changed[0]}: batch sizes come from train.micro_batch_size, "
            "train.gradient_accumulation_steps and scaling.num_workers; set those instead"
        )
    return merge_dicts(ds_config, ds.overrides)


def _zero_section(config: Config) -> dict[str, Any]:
    """The `zero_optimization` block for `deepspeed.zero_stage` and the offload settings."""
    ds, use_gpu = config.deepspeed, config.scaling.use_gpu
    stage = ds.zero_stage
    section: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        # Overlapping gradient reduction with backward needs CUDA streams; on CPU it only adds
        # buffers. Contiguous gradients avoid fragmenting memory as gradients arrive.
        section["overlap_comm"] = use_gpu
        section["contiguous_gradients"] = True
    if stage >= 1 and ds.offload_optimizer == "cpu":
        # Pinned host memory speeds up GPU<->CPU copies; without a GPU there is nothing to pin for.
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if stage == 3:
        if ds.offload_params == "cpu":
            section["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
        section.update(ZERO3_SETTINGS)
        # Weights are sharded across workers; gather them when saving so final/ holds a full
        # Hugging Face model rather than shards.
        section["stage3_gather_16bit_weights_on_model_save"] = True
    return section


def merge_dicts(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursively: where both hold a mapping under a key the two
    merge, otherwise the override's value replaces. Neither input is modified."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
