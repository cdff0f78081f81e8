"""Micro-batches without padding waste: padding-free packing (`pack_pairs`) and length grouping
(`group_by_length`).

Both leave the pairs of a micro-batch, and therefore the losses, as they are; they only change how
many pad tokens the policy and reference forwards pay for, which on skewed lengths is most of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dpo_cluster.batch.collate import ID_COLUMNS, PairSequences, read_pair_sequences, read_ref_logps
from dpo_cluster.logprobs import build_shifted_labels

# Default row capacities on the "mask" route are rounded up to a multiple of this many tokens.
ROW_MULTIPLE = 8

# Attention implementations and how each is told where packed sequences begin (see `packing_route`).
MASK_ATTENTION = ("eager", "sdpa")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")

PackingRoute = Literal["mask", "varlen"]


@dataclass
class PackedBatch(PairSequences):
    """B preference pairs as 2B sequences packed into R rows of L tokens.

    Sequence s < B is pair s's prompt + chosen, s >= B pair (s - B)'s prompt + rejected: the row
    order of `collate_pairs`, which every per-sequence result of this batch follows. Position ids
    restart at 0 for every sequence and attention never crosses from one sequence into another, so
    each token sees exactly what it sees in its own padded row (see `packing_route` for how the
    model is told). Per-token values come back to the padded (2B, T) layout with `unpack`.

    input_ids: (R, L) long; sequences end to end, each row's free tail filled with the pad id.
    position_ids: (R, L) long; 0, 1, ... within every sequence and within every free tail.
    completion_mask: (R, L) long; 1 on completion tokens. Label positions before the causal shift,
        as in `PreferenceBatch`; `shifted_labels` moves them and cuts them at sequence boundaries.
    seq_rows / seq_starts / seq_lengths: (2B,) long; the row, first column and length of each sequence.
    cu_seqlens: (N + 1,) int32 offsets of the N non-empty segments (sequences and free tails) in the
        flattened R * L tokens, for the varlen kernel; None on the "mask" route.
    max_seqlen: the longest segment, in tokens (varlen kernel argument).
    ref_chosen_logps / ref_rejected_logps: (B,) float32 precomputed reference log-probs, or None.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    seq_rows: torch.Tensor
    seq_starts: torch.Tensor
    seq_lengths: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """(2B,) tokens of each sequence (`seq_lengths`)."""
        return self.seq_lengths

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward: ids and position ids, no attention mask and no
        KV cache (transformers derives the packed mask from the position ids only when it has
        neither), plus the varlen kernel's segment offsets on the "varlen" route."""
        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
        }
        if self.cu_seqlens is not None:
            inputs |= {
                "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen,
                "max_length_k": self.max_seqlen,
            }
        return inputs

    def shifted_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal-shift targets on the packed layout: `-> labels (R, L), label_mask (R, L)`.

        As `build_shifted_labels`, except that the last token of a sequence is never scored: its
        successor in the row is the next sequence's first token (positions not consecutive).
        """
        labels, label_mask = build_shifted_labels(self.input_ids, self.completion_mask)
        positions = self.position_ids
        continues = positions[:, 1:] == positions[:, :-1] + 1
        label_mask[:, :-1] *= continues.to(label_mask.dtype)
        return labels, label_mask

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Gather per-token values into the padded layout: `(R, L) -> (2B, T)`, zeros past each end.

        T is the longest sequence; row s of the result is sequence s, as row s of `collate_pairs`.
        Differentiable (a gather), so summing the result over dim 1 gives per-sequence sums in the
        padded path's order and summation order.
        """
        num_rows, width = values.shape
        longest = int(self.seq_lengths.max().item())
        offsets = torch.arange(longest, device=values.device)
        index = (self.seq_rows * width + self.seq_starts).unsqueeze(1) + offsets
        index = torch.where(offsets < self.seq_lengths.unsqueeze(1), index, num_rows * width)
        flat = torch.cat([values.reshape(-1), values.new_zeros(1)])  # the last entry is the zero
        return flat[index]


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: sequence lengths (S,) -> rows as lists of sequence indices.

    Fewer, fuller rows are what packing saves: R rows instead of 2B padded ones.

    Sequences are taken longest first (ties by index, so the plan is deterministic) and each goes
    into the first row with room left, or opens a new row. A row's sequences are listed in the
    order they were placed. Raises ValueError when a sequence is longer than `capacity`.
    """
    if capacity < 1:
        raise ValueError(f"row capacity must be >= 1 token, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = int(lengths[index])
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the row capacity {capacity}")
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


def row_capacity(lengths: Sequence[int], row_tokens: int | None, varlen: bool) -> int:
    """Tokens per packed row: `row_tokens` when given (raised to the longest sequence, which cannot
    be split), else every token in one row ("varlen") or the longest sequence rounded up to
    `ROW_MULTIPLE` ("mask"). Dense attention is quadratic in the row length, so on the "mask" route
    rows no longer than a padded row keep its attention cost while the row count drops from 2B to
    about total tokens / row length; varlen kernels cost per sequence whatever the row length."""
    longest = max(int(n) for n in lengths)
    if row_tokens is not None:
        return max(row_tokens, longest)
    if varlen:
        return max(sum(int(n) for n in lengths), 1)
    return max(-(-longest // ROW_MULTIPLE) * ROW_MULTIPLE, ROW_MULTIPLE)


def pack_pairs(
    batch: Mapping[str, Any], pad_token_id: int, *, row_tokens: int | None = None, varlen: bool = False
) -> PackedBatch:
    """Pack B pairs into one `PackedBatch` (2B sequences -> (R, L) rows).

    batch: the columns `collate_pairs` takes (prompt_ids, chosen_ids, rejected_ids, optionally
        ref_chosen_logps and ref_rejected_logps); the same validation, the same ValueErrors.
    row_tokens: row capacity in tokens (see `row_capacity`); null picks the route's default.
    varlen: build `cu_seqlens` for flash-attn's varlen kernel (the "varlen" route).
    L is the fullest row's length, so no row ends in a column of padding only.
    """
    prompts, chosen, rejected = read_pair_sequences(batch)
    packed = pack_sequences(
        prompts * 2, chosen + rejected, pad_token_id, row_tokens=row_tokens, varlen=varlen
    )
    ref_chosen_logps, ref_rejected_logps = read_ref_logps(batch, len(prompts))
    return dataclasses.replace(
        packed, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps
    )


def pack_sequences(
    prompts: Sequence[np.ndarray],
    completions: Sequence[np.ndarray],
    pad_token_id: int,
    *,
    row_tokens: int | None = None,
    varlen: bool = False,
) -> PackedBatch:
    """N prompt + completion sequences (int64 1-D arrays) -> packed rows, as `pack_pairs` packs
    them; no reference values. Sequence s of the result is sequence s of the input."""
    sequences = [np.concatenate([p, c]) for p, c in zip(prompts, completions)]
    prompt_lengths = [len(p) for p in prompts]
    lengths = [len(s) for s in sequences]
    rows = plan_rows(lengths, row_capacity(lengths, row_tokens, varlen))
    width = max(max(sum(lengths[s] for s in row) for row in rows), 1)

    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    completion_mask = np.zeros((len(rows), width), dtype=np.int64)
    seq_rows = np.zeros(len(sequences), dtype=np.int64)
    seq_starts = np.zeros(len(sequences), dtype=np.int64)
    segments: list[int] = []  # lengths of sequences and free tails, in flattened order
    for row, members in enumerate(rows):
        column = 0
        for s in members:
            end = column + lengths[s]
            input_ids[row, column:end] = sequences[s]
            position_ids[row, column:end] = np.arange(lengths[s])
            completion_mask[row, column + prompt_lengths[s] : end] = 1
            seq_rows[s], seq_starts[s] = row, column
            segments.append(lengths[s])
            column = end
        position_ids[row, column:] = np.arange(width - column)
        segments.append(width - column)

    cu_seqlens = None
    kept = [n for n in segments if n > 0]
    if varlen:
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(kept)]), dtype=torch.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        completion_mask=torch.from_numpy(completion_mask),
        seq_rows=torch.from_numpy(seq_rows),
        seq_starts=torch.from_numpy(seq_starts),
        seq_lengths=torch.tensor(lengths, dtype=torch.int64),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(kept, default=0),
    )


def packing_route(*models: torch.nn.Module | None) -> tuple[PackingRoute | None, str]:
    """How packed rows reach these models' attention: ("mask" | "varlen", description), or
    (None, why packing cannot be used) for the caller to fall back to padded micro-batches.

    Every model that will score packed batches (policy, and a loaded reference) must agree. A model
    may be wrapped by peft or a DeepSpeed engine. Packing needs transformers' own modeling code
    (custom code may ignore packed position ids) and an attention implementation whose packed-
    sequence handling is known: `MASK_ATTENTION` or `VARLEN_ATTENTION`.

    - "mask" (eager, sdpa): the forward gets `position_ids` and no attention mask; transformers'
      masking utilities (`masking_utils.find_packed_sequence_indices`) read the boundaries off the
      position ids (a new sequence wherever the position does not go up by one) and build a
      block-diagonal causal mask. A row's free tail gets positions 0, 1, ... too, a segment of its
      own that no real token attends to.
    - "varlen" (flash_attention_2/3): the forward also gets `cu_seq_lens_q/k` and `max_length_q/k`,
      the cumulative segment lengths over the flattened R * L tokens, for flash-attn's varlen kernel.
    """
    from transformers import PreTrainedModel, masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return None, "this transformers version cannot build attention masks from packed position ids"
    routes: dict[str, str] = {}
    for model in models:
        if model is None:
            continue
        base = getattr(model, "module", model)  # a DeepSpeed engine
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # a peft model
        name = type(base).__name__
        if not isinstance(base, PreTrainedModel):
            return None, f"{name} is not a transformers model"
        module = type(base).__module__
        if not module.startswith("transformers.models."):
            return (
                None,
                f"{name} comes from custom modeling code ({module}) that may ignore packed position ids",
            )
        if "position_ids" not in inspect.signature(base.forward).parameters:
            return None, f"{name}.forward takes no position_ids"
        attention = getattr(base.config, "_attn_implementation", None)
        if attention in MASK_ATTENTION:
            routes[attention] = "mask"
        elif attention in VARLEN_ATTENTION:
            routes[attention] = "varlen"
        else:
            supported = ", ".join(MASK_ATTENTION + VARLEN_ATTENTION)
            return None, f"attention implementation {attention!r} of {name} is not one of {supported}"
    if not routes:
        return None, "no model to inspect"
    if len(set(routes.values())) > 1:
        return None, f"the models mix attention implementations ({', '.join(routes)})"
    route: PackingRoute = "varlen" if "varlen" in routes.values() else "mask"
    how = "flash-attn varlen kernels (cu_seqlens)" if route == "varlen" else "block-diagonal causal masks"
    return route, f"packed rows via {how} ({', '.join(routes)})"


# A batch of row positions and token counts only (`field_lengths` reads either kind of batch): what
# training workers shuffle, group and cut before fetching the rows they own.
INDEX_COLUMN = "row_index"
LENGTH_COLUMNS: tuple[str, str, str] = ("prompt_length", "chosen_length", "rejected_length")


def field_lengths(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, chosen, rejected) token counts of each pair, int64: from the LENGTH_COLUMNS of a
    length-only batch, else counted from the token-id columns."""
    if LENGTH_COLUMNS[0] in batch:
        return tuple(np.asarray(batch[name], dtype=np.int64) for name in LENGTH_COLUMNS)  # type: ignore[return-value]
    return tuple(np.array([len(ids) for ids in batch[name]], dtype=np.int64) for name in ID_COLUMNS)  # type: ignore[return-value]


def pair_lengths(batch: Mapping[str, Any]) -> np.ndarray:
    """Padded length of each pair: `batch (B pairs) -> (B,)` int64, the longer of prompt + chosen and
    prompt + rejected (the width the pair needs in a padded micro-batch)."""
    prompts, chosen, rejected = field_lengths(batch)
    return prompts + np.maximum(chosen, rejected)


def group_by_length(
    batches: Iterable[dict[str, Any]], window: int, seed: Sequence[int], first_window: int = 0
) -> Iterator[dict[str, Any]]:
    """Re-cut an ordered stream of micro-batches so each holds pairs of similar length (less
    padding) while the epoch-level order stays random (`train.group_by_length`, and the fallback
    where packing is unsupported).

    The stream is taken `window` micro-batches at a time; the window's pairs are sorted by
    `pair_lengths` (stable: ties keep stream order) and cut into micro-batches of the window's
    sizes, and these are yielded in an order drawn from `numpy.random.default_rng([*seed, w])` for
    window number w. Same stream, window and seed: same output, on every worker. A last, shorter
    window is grouped the same way. Every pair comes out exactly once. A stream that starts at window
    number `first_window` (a resumed epoch) is numbered from there. Since the result depends only
    on the stream, the window and the seed, the k % world_size == rank ownership of
    `WorkerContext.my_micro_batches` still holds.

    Columns come back as lists, except 1-D numeric numpy columns, which stay numpy arrays.
    """
    if window < 1:
        raise ValueError(f"length grouping window must be >= 1 micro-batch, got {window}")
    stream = iter(batches)
    for number in itertools.count(first_window):
        chunk = list(itertools.islice(stream, window))
        if not chunk:
            return
        yield from _regroup(chunk, np.random.default_rng([*seed, number]))


def _regroup(chunk: list[dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    columns = concat_batches(chunk)
    sizes = [len(next(iter(batch.values()))) for batch in chunk]
    order = np.argsort(pair_lengths(columns), kind="stable")
    pieces = np.split(order, np.cumsum(sizes)[:-1])
    for number in rng.permutation(len(pieces)):
        yield take_rows(columns, pieces[number])


def concat_batches(chunk: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Micro-batches of one stream -> one batch of all their pairs, in order. Columns come back as
    lists, except 1-D numeric numpy columns (row ids, reference log-probs), which stay numpy."""
    names = list(chunk[0])
    for batch in chunk[1:]:
        if list(batch) != names:
            raise ValueError(f"micro-batches of one stream differ in columns: {names} and {list(batch)}")
    return {
        name: np.concatenate([batch[name] for batch in chunk])
        if all(_is_numeric_vector(batch[name]) for batch in chunk)
        else [row for batch in chunk for row in batch[name]]
        for name in names
    }


def take_rows(columns: Mapping[str, Any], indices: np.ndarray) -> dict[str, Any]:
    """The pairs at `indices` (in that order) of a `concat_batches` result."""
    return {
        name: rows[indices] if isinstance(rows, np.ndarray) else [rows[i] for i in indices]
        for name, rows in columns.items()
    }


def _is_numeric_vector(column: Any) -> bool:
    """A 1-D numpy column of numbers (row ids, reference log-probs), as opposed to token-id lists."""
    return isinstance(column, np.ndarray) and column.ndim == 1 and column.dtype != object
