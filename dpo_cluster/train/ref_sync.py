"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment", the soft update of section 3): every `train.ref_model_sync_steps` optimizer steps the
in-loop reference moves toward the policy, ref <- alpha * policy + (1 - alpha) * ref, as TRL's
`SyncRefModelCallback` does after the optimizer step. The reference then is part of the run's
state, so checkpoints carry its weights and a resumed run goes on from the reference it had.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_cluster.config import TrainConfig

REFERENCE_FILE = "reference.pt"


def sync_due(train: TrainConfig, step: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based), as TRL's callback
    decides it: global_step % ref_model_sync_steps == 0."""
    return train.sync_ref_model and step % train.ref_model_sync_steps == 0


@torch.no_grad()
def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter, in place.

    The two must be the same architecture (the reference loads the policy's starting weights);
    a parameter whose name or shape differs is an error rather than a silent mix of unrelated
    weights. Tied weights appear once in `parameters()`, on both sides alike.
    """
    policy_params = list(policy.named_parameters())
    reference_params = list(reference.named_parameters())
    if len(policy_params) != len(reference_params):
        raise ValueError(
            f"train.sync_ref_model: the policy has {len(policy_params)} parameters, the reference "
            f"{len(reference_params)}; TR-DPO needs a reference of the policy's own architecture"
        )
    for (name, param), (ref_name, ref_param) in zip(policy_params, reference_params):
        if name != ref_name or param.shape != ref_param.shape:
            raise ValueError(
                f"train.sync_ref_model: policy parameter {name} {tuple(param.shape)} does not match "
                f"reference parameter {ref_name} {tuple(ref_param.shape)}"
            )
        ref_param.data.mul_(1.0 - alpha).add_(param.data.to(ref_param.dtype), alpha=alpha)


def save_reference(reference: torch.nn.Module, directory: Path, rank: int) -> None:
    """Rank 0 writes the reference's weights into a checkpoint directory (every rank holds the same
    replica, since each applies the same update to the same weights)."""
    if rank == 0:
        torch.save(reference.state_dict(), Path(directory) / REFERENCE_FILE)


def load_reference_weights(reference: torch.nn.Module, directory: Path) -> None:
    """Restore the reference a checkpoint holds; raises FileNotFoundError naming the file when the
    checkpoint was written without train.sync_ref_model."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: train.sync_ref_model is on, but this checkpoint holds no reference weights "
            "(it was written without TR-DPO); resume it with train.sync_ref_model: false"
        )
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
