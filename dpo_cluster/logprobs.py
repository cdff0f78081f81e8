"""Per-token and per-sequence log-probabilities of completion tokens under a causal LM's logits.

Rows (positions) are processed in fp32 chunks along the flattened B*T axis, and only rows whose label
is scored (mask == 1) at all, so no full-vocabulary fp32 (B, T, V) tensor is ever materialised: the
logits are the largest activation of a DPO step, and a second copy of them would set peak memory.
Labels and masks keep the logits' length T (see `build_shifted_labels`), which avoids slicing them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Budget for one fp32 chunk, in elements (64 Mi floats = 256 MiB). With a 152k vocabulary that is
# about 440 rows per chunk; with a 32k vocabulary about 2k rows.
DEFAULT_CHUNK_ELEMENTS = 64 * 1024 * 1024


def _rows_per_chunk(vocab_size: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    for name, tensor in (("labels", labels), ("completion_mask", mask)):
        if tensor is not None and tuple(tensor.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"{name} must be (B, T) = {tuple(logits.shape[:2])} to match logits, got {tuple(tensor.shape)}"
            )


def selected_rows(mask: torch.Tensor | None, num_rows: int, device: torch.device) -> torch.Tensor:
    """Flat indices (M,) of the rows to score: where mask != 0, or every row without a mask."""
    if mask is None:
        return torch.arange(num_rows, device=device)
    return mask.reshape(-1).nonzero().squeeze(1)


def _map_rows(
    logits_2d: torch.Tensor,
    rows: torch.Tensor,
    chunk_rows: int,
    fn: Callable[[torch.Tensor, slice], torch.Tensor],
) -> torch.Tensor:
    """Apply `fn(fp32 chunk (m, V), slice into rows) -> (m,)` over `rows` in chunks; returns (M,) fp32."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=logits_2d.device)
    for start in range(0, rows.numel(), chunk_rows):
        part = slice(start, start + chunk_rows)
        chunk = logits_2d.index_select(0, rows[part]).float()
        out[part] = fn(chunk, part)
    return out


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Place (M,) per-row values into a zero (B, T) tensor at flat positions `rows`."""
    out = values.new_zeros(shape.numel())
    out = out.index_copy(0, rows, values)
    return out.view(shape)


class _SelectedTokenLogps(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits) for selected rows of (N, V) logits -> (M,) fp32.

    Backward: d log p_y / d z_j = 1[j = y] - softmax(z)_j, recomputed per chunk, so the only full-size
    tensor is the logits gradient itself (in the logits' dtype).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits_2d: torch.Tensor,
        labels_1d: torch.Tensor,
        rows: torch.Tensor,
        chunk_rows: int,
    ) -> torch.Tensor:
        row_labels = labels_1d.index_select(0, rows)
        logsumexp = _map_rows(logits_2d, rows, chunk_rows, lambda z, _part: torch.logsumexp(z, dim=-1))
        target = logits_2d[rows, row_labels].float()
        ctx.save_for_backward(logits_2d, rows, row_labels, logsumexp)
        ctx.chunk_rows = chunk_rows
        return target - logsumexp

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        logits_2d, rows, row_labels, logsumexp = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_logits = torch.zeros_like(logits_2d)
        for start in range(0, rows.numel(), ctx.chunk_rows):
            part = slice(start, start + ctx.chunk_rows)
            chunk_idx = rows[part]
            go = grad_out[part].float().unsqueeze(1)
            probs = torch.exp(logits_2d.index_select(0, chunk_idx).float() - logsumexp[part].unsqueeze(1))
            grad = probs.mul_(-go)
            grad.scatter_add_(1, row_labels[part].unsqueeze(1), go)
            grad_logits.index_copy_(0, chunk_idx, grad.to(grad_logits.dtype))
        return grad_logits, None, None, None


def build_shifted_labels(
    input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-shift targets: `input_ids (B, T), completion_mask (B, T) -> labels (B, T), label_mask (B, T)`.

    Logits at position t predict token t + 1, so `labels[:, t] = input_ids[:, t + 1]` and
    `label_mask[:, t] = completion_mask[:, t + 1]`; the last position has no target (label 0, mask 0).
    `completion_mask` is 1 on completion (chosen/rejected answer) tokens and 0 on prompt and padding.
    The result lines up with the model's (B, T, V) logits without slicing them.
    """
    if input_ids.shape != completion_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and completion_mask must both be (B, T), got {tuple(input_ids.shape)} "
            f"and {tuple(completion_mask.shape)}"
        )
    labels = torch.zeros_like(input_ids, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    label_mask = torch.zeros_like(completion_mask)
    label_mask[:, :-1] = completion_mask[:, 1:]
    return labels, label_mask


def compute_token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-token label log-probs: `logits (B, T, V), labels (B, T) int64, completion_mask (B, T) -> (B, T)` fp32.

    `log p(labels[b, t]) = logits[b, t, labels[b, t]] - logsumexp_v logits[b, t, v]`, computed in fp32
    chunks of `chunk_rows` rows (default: as many as fit in `DEFAULT_CHUNK_ELEMENTS`). Positions where
    `completion_mask == 0` are 0, are never read (their labels may be anything, e.g. -100) and get no
    gradient. `labels` and `completion_mask` are already shifted (see `build_shifted_labels`).
    Differentiable with respect to `logits`; the gradient comes back in the logits' dtype.
    """
    _check_shapes(logits, labels, completion_mask)
    batch, seq, vocab = logits.shape
    logits_2d = logits.reshape(batch * seq, vocab)  # a view when logits are contiguous
    rows = selected_rows(completion_mask, batch * seq, logits.device)
    row_logps = _SelectedTokenLogps.apply(
        logits_2d, labels.reshape(-1).long(), rows, _rows_per_chunk(vocab, chunk_rows)
    )
    return scatter_rows(row_logps, rows, logits.shape[:2])


@torch.no_grad()
def compute_mean_logits(
    logits: torch.Tensor, completion_mask: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Vocabulary-mean logit per scored position: `logits (B, T, V), mask (B, T) -> (B, T)` fp32, no grad.

    `out[b, t] = mask[b, t] * mean_v logits[b, t, v]`. Per position rather than per row, so packed
    rows holding several sequences can be summed per sequence (`dpo_cluster.batch.packing`).
    """
    _check_shapes(logits, None, completion_mask)
    batch, seq, vocab = logits.shape
    logits_2d = logits.detach().reshape(batch * seq, vocab)
    rows = selected_rows(completion_mask, batch * seq, logits.device)
    means = _map_rows(logits_2d, rows, _rows_per_chunk(vocab, chunk_rows), lambda z, _part: z.mean(dim=-1))
    return scatter_rows(means, rows, logits.shape[:2])


@torch.no_grad()
def compute_wpo_token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """WPO's aligned token log-probs: `logits (B, T, V), labels (B, T), mask (B, T) -> (B, T)` fp32, no grad.

    Weighted Preference Optimization (Zhou et al. 2024, eq. 2) weights a pair by how likely the
    current policy is to produce it, with per-token probabilities aligned to the policy's own sampling
    distribution: `out[b, t] = log p(y_t) - log sum_v p_v^2`, where p is the next-token distribution
    at t and `log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)` for logits z; 0 where mask == 0.
    A sequence's log-weight is the mean over its completion tokens (count clamped to at least 1, as
    TRL does), the pair weight `exp(log w(chosen) + log w(rejected))`. Per position rather than per
    row, so packed rows holding several sequences can be reduced per sequence.
    """
    _check_shapes(logits, labels, completion_mask)
    batch, seq, vocab = logits.shape
    logits_2d = logits.detach().reshape(batch * seq, vocab)
    rows = selected_rows(completion_mask, batch * seq, logits.device)
    row_labels = labels.reshape(-1).long().index_select(0, rows)

    def aligned_logp(z: torch.Tensor, part: slice) -> torch.Tensor:
        logsumexp = torch.logsumexp(z, dim=-1)
        target = z.gather(1, row_labels[part].unsqueeze(1)).squeeze(1)
        return (target - logsumexp) - log_sum_squared_probs(z, logsumexp)

    values = _map_rows(logits_2d, rows, _rows_per_chunk(vocab, chunk_rows), aligned_logp)
    return scatter_rows(values, rows, logits.shape[:2])


def log_sum_squared_probs(logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """`log sum_v p_v^2` of the softmax of `logits (m, V)`, given their `logsumexp (m,)` -> (m,):
    `logsumexp(2 z) - 2 logsumexp(z)`, the normaliser of WPO's aligned log-probs."""
    return torch.logsumexp(2 * logits, dim=-1) - 2 * logsumexp


def compute_ld_sequence_logps(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO sequence log-probs: `token_logps (B, T), masks (B, T) -> (chosen (B,), rejected (B,))`.

    Length-desensitised DPO (LD-DPO, Liu et al. 2024): of each pair, the first
    `l_p = min(|y_chosen|, |y_rejected|)` completion tokens count fully and the longer answer's
    remaining "verbose" tokens are scaled by alpha:
    `log pi(y) = sum_{t <= l_p} log p(y_t) + alpha * sum_{t > l_p} log p(y_t)`.
    alpha = 1 is plain summation; alpha = 0 drops the tail. Apply it to policy and reference alike.
    Token positions are counted within the completion (mask cumsum), as TRL does.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"LD-DPO alpha must lie in [0, 1], got {alpha}")
    chosen_positions = chosen_mask.cumsum(dim=1)
    rejected_positions = rejected_mask.cumsum(dim=1)
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)).unsqueeze(1)

    def weighted(token_logps: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        scored = mask.bool()
        shared_mask = scored & (positions <= shared)
        tail_mask = scored & (positions > shared)
        return (token_logps * shared_mask).sum(dim=1) + alpha * (token_logps * tail_mask).sum(dim=1)

    return (
        weighted(chosen_token_logps, chosen_mask, chosen_positions),
        weighted(rejected_token_logps, rejected_mask, rejected_positions),
    )
