"""Token-budget micro-batches (`train.max_tokens_per_micro_batch`): each optimizer step's pairs
are cut into forward passes by the tokens they cost rather than by a fixed pair count, so every
forward costs about the same memory while a step keeps the global batch (micro_batch_size x
gradient_accumulation_steps x num_workers) that DPO's hyperparameters are tuned for. The cut works
on sequence lengths alone, with numpy; the layout helpers it uses come from `dpo_cluster.batch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dpo_cluster.batch.packing import field_lengths, pair_lengths, plan_rows, row_capacity

Layout = Literal["padded", "mask", "varlen"]
"""How a micro-batch reaches the model: padded rows, or packed rows on a `packing_route`."""


@dataclass(frozen=True)
class TokenBudget:
    """The budget in tokens and the layout whose tensor size it bounds."""

    max_tokens: int
    layout: Layout = "padded"
    row_tokens: int | None = None  # train.packing_row_tokens (packed layouts)

    def cost(self, sequence_lengths: Sequence[int]) -> int:
        """See `micro_batch_cost`."""
        return micro_batch_cost(sequence_lengths, self.layout, self.row_tokens)

    def cut(self, pairs: Mapping[str, Any], world_size: int) -> list[list[np.ndarray]]:
        """A step's pairs -> for each worker, the index arrays of its micro-batches.

        Pairs go longest first (`pair_lengths`; ties keep stream order) into a micro-batch while its
        `cost` stays within the budget; a pair over the budget alone forms a micro-batch of its own
        (the config check makes the budget hold a pair of data.max_length tokens). `deal` then gives
        every worker as many. The cut depends only on the step's pairs, so every worker computes it alike.
        """
        prompts, chosen, rejected = field_lengths(pairs)
        chosen_lengths, rejected_lengths = (prompts + chosen).tolist(), (prompts + rejected).tolist()
        order = np.argsort(-pair_lengths(pairs), kind="stable")
        pieces: list[list[int]] = []
        current: list[int] = []
        for index in order.tolist():
            candidate = [*current, index]
            lengths = [chosen_lengths[i] for i in candidate] + [rejected_lengths[i] for i in candidate]
            if current and self.cost(lengths) > self.max_tokens:
                pieces.append(current)
                candidate = [index]
            current = candidate
        if current:
            pieces.append(current)
        return [[np.asarray(p) for p in mine] for mine in deal(pieces, world_size)]


def micro_batch_cost(sequence_lengths: Sequence[int], layout: Layout, row_tokens: int | None = None) -> int:
    """Tokens of the input tensor one forward computes for these 2B sequences, padding included:
    2B x the longest sequence for padded rows, rows x width as `pack_pairs` lays them out on the
    "mask" route, and the real tokens on the "varlen" route (one row, no padding)."""
    if not sequence_lengths:
        return 0
    if layout == "padded":
        return len(sequence_lengths) * max(sequence_lengths)
    if layout == "varlen" and row_tokens is None:
        return int(sum(sequence_lengths))
    rows = plan_rows(sequence_lengths, row_capacity(sequence_lengths, row_tokens, varlen=layout == "varlen"))
    return len(rows) * max(sum(sequence_lengths[s] for s in row) for row in rows)


def deal(pieces: list[list[int]], world_size: int) -> list[list[list[int]]]:
    """Halve the largest micro-batch until their number is a multiple of `world_size`, then deal
    micro-batch j to worker j % world_size: DeepSpeed's collectives (ZeRO-2 gradient reduction,
    ZeRO-3 parameter gathers) run per micro-batch and must line up across workers. Needs at least
    `world_size` pairs in all when the count is not already a multiple (a step always has a
    multiple of world_size pairs)."""
    pieces = [list(p) for p in pieces]
    while len(pieces) % world_size:
        largest = max(range(len(pieces)), key=lambda j: (len(pieces[j]), -j))
        piece = pieces[largest]
        if len(piece) < 2:
            raise ValueError(f"{sum(map(len, pieces))} pairs cannot be dealt evenly to {world_size} workers")
        half = (len(piece) + 1) // 2
        pieces[largest : largest + 1] = [piece[:half], piece[half:]]
    return [pieces[rank::world_size] for rank in range(world_size)]
