"""Unpaired (KTO) micro-batches: rows of the prepared split -> labelled examples and their KL pairs.

The prepared data keeps one layout for every objective: a row has prompt_ids, chosen_ids and
rejected_ids. An unpaired row (`data.format` unpaired / unpaired_conversational) fills one side
only: a desirable completion is its chosen_ids, an undesirable one its rejected_ids, the other
side empty. A pair row holds both and gives two examples, the chosen desirable and the rejected
undesirable, as TRL's `unpair_preference_dataset` splits pairs.

A micro-batch's examples are every row's chosen side, in row order, then every row's rejected
side (TRL's unpairing order), and example i's KL sequence is its prompt with example i - 1's
completion (the first takes the last's), TRL's rotation within a batch: mismatched pairs whose
completions are the batch's own. Examples and KL sequences are two micro-batches of E sequences
each, padded or packed as pairs' are (`collate_sequences`, `pack_sequences`), so the policy can
score the KL sequences without gradient. A KL sequence longer than `max_length` loses the end of
its completion, as TRL's collator cuts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpo_cluster.batch.collate import read_pair_sequences
from dpo_cluster.batch.logps import MicroBatch

CollateSequences = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], MicroBatch]
"""(prompts, completions) -> one micro-batch of those sequences, padded or packed."""


@dataclass
class UnpairedBatch:
    """E labelled examples of `num_rows` prepared rows.

    examples: example i's prompt + completion as sequence i (E sequences), padded or packed.
    kl: example i's KL sequence (its prompt + example i - 1's completion) as sequence i.
    labels: (E,) bool, True for desirable.
    num_rows: rows of the split behind the examples (what the loop weighs micro-batches by).
    """

    examples: MicroBatch
    kl: MicroBatch
    labels: torch.Tensor
    num_rows: int

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_pairs(self) -> int:
        """The rows behind the batch: a micro-batch's share of an optimizer step, as for pairs."""
        return self.num_rows

    @property
    def num_tokens(self) -> int:
        """Real tokens of the examples and KL sequences, padding excluded."""
        return self.examples.num_tokens + self.kl.num_tokens

    @property
    def num_entries(self) -> int:
        """Entries of the input tensors the forwards compute, padding or packed tails included."""
        return self.examples.input_ids.numel() + self.kl.input_ids.numel()

    def to(self, device: torch.device | str) -> UnpairedBatch:
        return UnpairedBatch(
            self.examples.to(device), self.kl.to(device), self.labels.to(device), self.num_rows
        )


def build_examples(
    batch: Mapping[str, Any], max_length: int
) -> tuple[dict[str, list[list[int]]], list[bool]]:
    """Rows (prompt_ids, chosen_ids, rejected_ids columns) -> the examples' columns (prompt_ids,
    completion_ids, kl_completion_ids: E lists each) and their labels.

    Raises ValueError for a row with neither side, and for fewer than two examples (the KL
    estimate needs another example's completion)."""
    prompts, chosen, rejected = read_pair_sequences(batch)
    desirable = [(p, c) for p, c in zip(prompts, chosen) if len(c)]
    undesirable = [(p, r) for p, r in zip(prompts, rejected) if len(r)]
    empty = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if not len(c) and not len(r)]
    if empty:
        raise ValueError(f"unpaired batch: row {empty[0]} has neither a chosen nor a rejected completion")
    examples = desirable + undesirable
    if len(examples) < 2:
        raise ValueError(
            "unpaired batch: KTO needs at least two examples per micro-batch (the KL estimate pairs "
            "each prompt with another example's completion); raise train.micro_batch_size"
        )
    example_prompts = [prompt.tolist() for prompt, _ in examples]
    completions = [completion.tolist() for _, completion in examples]
    shifted = completions[-1:] + completions[:-1]
    kl_completions = [kl[: max(0, max_length - len(p))] for p, kl in zip(example_prompts, shifted)]
    columns = {
        "prompt_ids": example_prompts,
        "completion_ids": completions,
        "kl_completion_ids": kl_completions,
    }
    return columns, [True] * len(desirable) + [False] * len(undesirable)


def build_unpaired_batch(
    batch: Mapping[str, Any], max_length: int, collate: CollateSequences
) -> UnpairedBatch:
    """Rows -> an `UnpairedBatch` whose two micro-batches `collate` (padded or packed) builds."""
    columns, labels = build_examples(batch, max_length)

    def arrays(name: str) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in columns[name]]

    prompts = arrays("prompt_ids")
    return UnpairedBatch(
        collate(prompts, arrays("completion_ids")),
        collate(prompts, arrays("kl_completion_ids")),
        torch.tensor(labels, dtype=torch.bool),
        len(batch["prompt_ids"]),
    )
