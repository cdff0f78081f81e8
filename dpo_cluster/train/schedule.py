"""Learning-rate schedules (`train.lr_scheduler`, `train.warmup_ratio`) as torch `LambdaLR`s: a
linear warmup from 0, then a linear decay to 0 at the last step, half a cosine period down to 0,
or constant. The multipliers are those of transformers' `get_linear_schedule_with_warmup`,
`get_cosine_schedule_with_warmup` and `get_constant_schedule_with_warmup` (except that constant
keeps its warmup), written out so that a training worker never imports transformers' Trainer
utilities and, through them, peft.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

ScheduleKind = Literal["linear", "cosine", "constant"]
KINDS: tuple[str, ...] = ("linear", "cosine", "constant")


def lr_multiplier(step: int, *, kind: ScheduleKind, warmup_steps: int, total_steps: int) -> float:
    """The factor applied to the learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps)))
    raise ValueError(f"lr_scheduler: {' | '.join(KINDS)}, got {kind!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: ScheduleKind, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over `optimizer` following `lr_multiplier` (a partial, so its state saves)."""
    if kind not in KINDS:
        raise ValueError(f"lr_scheduler: {' | '.join(KINDS)}, got {kind!r}")
    multiplier = partial(lr_multiplier, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
