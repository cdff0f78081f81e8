"""Which pairs a training run reads, in the order it first reads them: what the reference scores.

Training reads an epoch as `epoch_order` (one seeded permutation, the same on every worker) cut
into micro-batches; a step takes the next gradient_accumulation_steps x num_workers of them, and
length grouping only reorders pairs inside windows of `train.length_group_window` micro-batches.
So the pairs of the first S steps are known from (seed, epoch, S) alone, before any worker starts:
evaluation's micro-batches first (the first evaluation then waits for no train pair), then train
pairs step by step until the run's last step. A run of `max_steps` scores those steps' pairs, not
the whole split. Cost: one permutation per epoch the run reaches (8 bytes a pair, transient).
"""

from __future__ import annotations

import numpy as np

from dpo_cluster.config import Config
from dpo_cluster.data.layout import epoch_order


def scoring_order(config: Config, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """{split: int64 positions}: every pair of each split the run will read, each once, in the order
    the run first reads it; "eval" first. `counts`: rows per prepared split."""
    train, world = config.train, config.scaling.num_workers
    micro = train.micro_batch_size
    # Grouping (asked for, or packing's fallback) re-cuts whole windows: take the window a step ends in.
    window = train.length_group_window if (train.group_by_length or train.packing) else None
    order: dict[str, np.ndarray] = {}

    eval_rows = counts.get("eval", 0)
    if eval_rows >= micro * world and train.eval_strategy != "no":
        batches = (eval_rows // micro) // world * world  # as many as every worker evaluates
        order["eval"] = np.arange(_whole_windows(batches, window, eval_rows // micro) * micro)

    rows = counts.get("train", 0)
    per_epoch = train.steps_per_epoch(rows, world)
    steps = train.total_steps(rows, world) if per_epoch else 0
    seen = np.zeros(rows, dtype=bool)
    pieces, epoch = [], 0
    while steps > 0 and not seen.all():
        taken = min(steps, per_epoch)
        batches = _whole_windows(taken * train.gradient_accumulation_steps * world, window, rows // micro)
        positions = epoch_order(rows, train.seed, epoch, train.shuffle)[: batches * micro]
        new = positions[~seen[positions]]
        seen[new] = True
        pieces.append(new)
        steps, epoch = steps - taken, epoch + 1
        if not train.shuffle:
            break  # every epoch reads the same order
    order["train"] = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return order


def _whole_windows(batches: int, window: int | None, epoch_batches: int) -> int:
    """`batches` micro-batches rounded up to whole grouping windows, within the epoch's."""
    if window is None:
        return batches
    return min(-(-batches // window) * window, epoch_batches)
