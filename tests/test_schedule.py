"""Learning-rate schedules: transformers' multipliers step for step, warmup honoured by every kind,
state that saves and restores, and no peft import for a training worker that does not use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import get_scheduler

from dpo_cluster.train.schedule import build_lr_scheduler, lr_multiplier

# Our kind -> the transformers schedule it must equal ("constant" keeps its warmup, as documented).
TRANSFORMERS_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (1, 1), (4, 7)])
def test_rates_equal_transformers_schedules(kind: str, warmup: int, total: int) -> None:
    ours = build_lr_scheduler(_optimizer(), kind, warmup_steps=warmup, total_steps=total)  # type: ignore[arg-type]
    theirs = get_scheduler(
        TRANSFORMERS_NAMES[kind], _optimizer(), num_warmup_steps=warmup, num_training_steps=total
    )
    assert _rates(ours, total + 2) == pytest.approx(_rates(theirs, total + 2), abs=1e-12)


def test_hand_computed_points() -> None:
    # 2 warmup steps of 10: 0, 1/2, then linear 1 - (s - 2) / 8; cosine (1 + cos(pi (s - 2) / 8)) / 2.
    linear = [lr_multiplier(s, kind="linear", warmup_steps=2, total_steps=10) for s in (0, 1, 2, 6, 10)]
    assert linear == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    cosine = [lr_multiplier(s, kind="cosine", warmup_steps=2, total_steps=10) for s in (2, 6, 10)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0])
    assert lr_multiplier(1, kind="constant", warmup_steps=4, total_steps=10) == 0.25
    assert lr_multiplier(9, kind="constant", warmup_steps=4, total_steps=10) == 1.0
    with pytest.raises(ValueError, match="linear | cosine | constant, got 'step'"):
        build_lr_scheduler(_optimizer(), "step", warmup_steps=0, total_steps=3)  # type: ignore[arg-type]


def test_state_restores_the_position() -> None:
    first = build_lr_scheduler(_optimizer(), "cosine", warmup_steps=2, total_steps=10)
    _rates(first, 5)
    second = build_lr_scheduler(_optimizer(), "cosine", warmup_steps=2, total_steps=10)
    second.load_state_dict(first.state_dict())
    assert _rates(second, 5) == pytest.approx(_rates(first, 5))


def test_the_training_loop_does_not_import_peft() -> None:
    code = (
        "import sys, torch\n"
        "import dpo_cluster.train.local, dpo_cluster.train.loop\n"
        "from dpo_cluster.train.schedule import build_lr_scheduler\n"
        "build_lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 'linear',"
        " warmup_steps=1, total_steps=4)\n"
        "print(sorted(m for m in ('peft', 'transformers.trainer_utils') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
