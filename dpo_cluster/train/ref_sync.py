"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment", the soft update of section 3): every `train.ref_model_sync_steps` optimizer steps the
in-loop reference moves toward the policy, ref <- alpha * policy + (1 - alpha) * ref, as TRL's
`SyncRefModelCallback` does after the optimizer step. The reference then is part of the run's
state, so checkpoints carry its weights and a resumed run goes on from the reference it had.

Under ZeRO-3 both models are sharded: the update gathers their parameters, rank 0 mixes them and
DeepSpeed partitions the result again (TRL's way); saving and loading gather the same way. The
gathers are collectives, so every rank calls these functions alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpo_cluster.config import TrainConfig

REFERENCE_FILE = "reference.pt"


def sync_due(train: TrainConfig, step: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based), as TRL's callback
    decides it: global_step % ref_model_sync_steps == 0."""
    return train.sync_ref_model and step % train.ref_model_sync_steps == 0


def _module(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine holds its model as .module


def _sharded(params: list[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None) -> Iterator[bool]:
    """Inside: whole parameters on every rank when ZeRO-3 shards them (changes made by
    `modifier_rank` are partitioned again on exit); yields whether this rank may read/modify."""
    if not _sharded(params):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield modifier_rank is None or _rank() == modifier_rank


def _matched_params(policy: Any, reference: Any) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(policy, reference) parameter pairs, name by name; ValueError on another architecture."""
    policy_params = list(_module(policy).named_parameters())
    reference_params = list(_module(reference).named_parameters())
    if len(policy_params) != len(reference_params):
        raise ValueError(
            f"train.sync_ref_model: the policy has {len(policy_params)} parameters, the reference "
            f"{len(reference_params)}; TR-DPO needs a reference of the policy's own architecture"
        )
    pairs = []
    for (name, param), (ref_name, ref_param) in zip(policy_params, reference_params):
        shape = getattr(param, "ds_shape", param.shape)
        ref_shape = getattr(ref_param, "ds_shape", ref_param.shape)
        if name != ref_name or shape != ref_shape:
            raise ValueError(
                f"train.sync_ref_model: policy parameter {name} {tuple(shape)} does not match "
                f"reference parameter {ref_name} {tuple(ref_shape)}"
            )
        pairs.append((param, ref_param))
    return pairs


@torch.no_grad()
def sync_reference(policy: Any, reference: Any, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter, in place (modules or
    DeepSpeed engines; sharded under ZeRO-3).

    The two must be the same architecture (the reference loads the policy's starting weights);
    a parameter whose name or shape differs is an error rather than a silent mix of unrelated
    weights. Tied weights appear once in `parameters()`, on both sides alike.
    """
    pairs = _matched_params(policy, reference)
    params = [p for pair in pairs for p in pair]
    with _gathered(params, modifier_rank=0) as mine:
        if mine:
            for param, ref_param in pairs:
                ref_param.data.mul_(1.0 - alpha).add_(param.data.to(ref_param.dtype), alpha=alpha)


@torch.no_grad()
def save_reference(reference: Any, directory: Path, rank: int) -> None:
    """Rank 0 writes the reference's parameters into a checkpoint directory (without ZeRO-3 every
    rank holds the same replica; under it they are gathered first, on every rank)."""
    named = list(_module(reference).named_parameters())
    with _gathered([p for _, p in named], modifier_rank=None):
        if rank == 0:
            torch.save(
                {name: p.detach().cpu().clone() for name, p in named}, Path(directory) / REFERENCE_FILE
            )


@torch.no_grad()
def load_reference_weights(reference: Any, directory: Path) -> None:
    """Restore the reference a checkpoint holds; raises FileNotFoundError naming the file when the
    checkpoint was written without train.sync_ref_model."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: train.sync_ref_model is on, but this checkpoint holds no reference weights "
            "(it was written without TR-DPO); resume it with train.sync_ref_model: false"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    named = list(_module(reference).named_parameters())
    missing = sorted({name for name, _ in named} ^ set(saved))
    if missing:
        raise ValueError(f"{path}: does not match the reference's parameters ({', '.join(missing[:5])})")
    with _gathered([p for _, p in named], modifier_rank=0) as mine:
        if mine:
            for name, param in named:
                param.data.copy_(saved[name].to(param.dtype))
