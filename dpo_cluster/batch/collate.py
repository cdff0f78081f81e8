"""Batch preference pairs into the padded tensors one policy forward pass consumes.

B pairs become 2B right-padded rows, prompt + chosen first and prompt + rejected after, so one
forward scores both answers and the halves line up pair by pair. The layout, dtypes and masks are
those of TRL 1.16's `DataCollatorForPreference`, so log-probs and losses match its `DPOTrainer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

ID_COLUMNS: tuple[str, str, str] = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS: tuple[str, str] = ("ref_chosen_logps", "ref_rejected_logps")


_Batch = TypeVar("_Batch", bound="PairSequences")


class PairSequences:
    """What padded and packed micro-batches share: 2B sequences, pair i's chosen answer at i and its
    rejected answer at B + i, with `sequence_lengths` (2B,) real tokens each; every tensor field
    moves with `to`."""

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """(2B,) prompt + completion tokens of each sequence."""
        raise NotImplementedError

    @property
    def num_pairs(self) -> int:
        """B, the number of preference pairs (half the sequences)."""
        return self.sequence_lengths.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        """Real tokens over all 2B sequences (prompts counted in both halves), padding excluded."""
        return int(self.sequence_lengths.sum().item())

    def to(self: _Batch, device: torch.device | str, non_blocking: bool = False) -> _Batch:
        """The same batch with every tensor on `device`."""
        moved = {
            item.name: value.to(device, non_blocking=non_blocking)
            for item in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(value := getattr(self, item.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]


@dataclass
class PreferenceBatch(PairSequences):
    """B preference pairs as 2B padded sequences (chosen half first, then rejected half).

    input_ids: (2B, T) long; prompt + completion tokens, right-padded with the pad token id.
    attention_mask: (2B, T) long; 1 on real tokens, 0 on padding.
    completion_mask: (2B, T) long; 1 on completion tokens. These are label positions before the
        causal shift: `dpo_cluster.logprobs.build_shifted_labels` moves them one step left.
    ref_chosen_logps / ref_rejected_logps: (B,) float32 precomputed reference log-probs, or None
        when the reference model scores the batch during training.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """(2B,) non-pad tokens of each row."""
        return self.attention_mask.sum(dim=1)


def collate_pairs(
    batch: Mapping[str, Any], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Pad B pairs into one `PreferenceBatch` (without truncation: the data pipeline has cut rows
    to `data.max_length` already).

    batch: one batch of Ray Data's `iter_batches(batch_format="numpy")` or plain lists: columns
        `prompt_ids`, `chosen_ids`, `rejected_ids` (B 1-D integer sequences each: object arrays of
        int32 arrays, a 2-D array when all rows have one length, or lists of lists) and optionally
        `ref_chosen_logps`, `ref_rejected_logps` (B floats each, both or neither). Other columns
        (row ids, notes) are ignored.
    Returns tensors of shape (2B, T) with T the longest prompt + completion, rounded up to a
    multiple of `pad_to_multiple_of` when given (tensor-core friendly shapes on GPU).
    Raises ValueError on an empty batch, a missing column, or columns of different lengths.
    """
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    prompts, chosen, rejected = read_pair_sequences(batch)
    padded = collate_sequences(prompts * 2, chosen + rejected, pad_token_id, pad_to_multiple_of)
    ref_chosen_logps, ref_rejected_logps = read_ref_logps(batch, len(prompts))
    return dataclasses.replace(
        padded, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps
    )


def collate_sequences(
    prompts: Sequence[np.ndarray],
    completions: Sequence[np.ndarray],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> PreferenceBatch:
    """N prompt + completion sequences (int64 1-D arrays) -> N padded rows (N, T), as
    `collate_pairs` pads them; no reference values. Any N >= 1: its `num_pairs` only means pairs
    when the rows are a pair batch's (unpaired batches use it for their examples, `batch.unpaired`)."""
    prompt_lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    total_lengths = prompt_lengths + np.array([len(c) for c in completions], dtype=np.int64)
    max_length = int(total_lengths.max())
    if pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
        max_length += pad_to_multiple_of - max_length % pad_to_multiple_of

    input_ids = np.full((len(prompts), max_length), pad_token_id, dtype=np.int64)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : len(prompt) + len(completion)] = completion
    positions = np.arange(max_length)[None, :]
    attention_mask = positions < total_lengths[:, None]
    completion_mask = attention_mask & (positions >= prompt_lengths[:, None])
    return PreferenceBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
        completion_mask=torch.from_numpy(completion_mask.astype(np.int64)),
    )


def read_pair_sequences(
    batch: Mapping[str, Any],
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The B prompts, chosen and rejected completions of a batch as int64 1-D arrays.

    Raises ValueError on an empty batch, a missing column, or columns of different lengths.
    """
    missing = [name for name in ID_COLUMNS if name not in batch]
    if missing:
        raise ValueError(f"preference batch lacks column(s) {', '.join(missing)}; has {', '.join(batch)}")
    prompts, chosen, rejected = (_id_sequences(batch[name], name) for name in ID_COLUMNS)
    num_pairs = len(prompts)
    if num_pairs == 0:
        raise ValueError("cannot collate an empty preference batch (0 pairs)")
    if not len(chosen) == len(rejected) == num_pairs:
        raise ValueError(
            f"preference batch columns differ in length: prompt_ids {num_pairs}, "
            f"chosen_ids {len(chosen)}, rejected_ids {len(rejected)}"
        )
    return prompts, chosen, rejected


def _id_sequences(column: Any, name: str) -> list[np.ndarray]:
    """One int64 1-D array per row of a token-id column (object array, 2-D array or lists)."""
    sequences = []
    for index, row in enumerate(column):
        ids = np.asarray(row, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"{name}[{index}]: expected a 1-D sequence of token ids, got shape {ids.shape}")
        sequences.append(ids)
    return sequences


def read_ref_logps(
    batch: Mapping[str, Any], num_pairs: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The precomputed reference log-probs as (B,) float32 tensors, or (None, None) when absent."""
    present = [name for name in REF_COLUMNS if name in batch]
    if not present:
        return None, None
    if len(present) == 1:
        # The losses need both halves; one alone means the precompute step went wrong.
        raise ValueError(f"preference batch has {present[0]} but not its pair column; need both or neither")
    tensors: list[torch.Tensor] = []
    for name in REF_COLUMNS:
        values = np.asarray(batch[name], dtype=np.float32)
        if values.shape != (num_pairs,):
            raise ValueError(f"{name}: expected {num_pairs} values (one per pair), got shape {values.shape}")
        # Copy: Ray hands out read-only buffers, and the tensor must not alias the batch.
        tensors.append(torch.from_numpy(values.copy()))
    return tensors[0], tensors[1]
