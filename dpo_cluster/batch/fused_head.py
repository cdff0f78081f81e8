"""Label log-probs through a plain linear output head with a hand-written backward.

Autograd through a chunked head (even checkpointed) keeps a (chunk, V) fp32 block per step of the
graph and makes one dense (V, H) weight gradient per chunk, summed in a second buffer; at a 150k
vocabulary each is hundreds of MB. Here rows go `chunk_size` at a time and the vocabulary in
tiles, so one (chunk, tile) block of at most `BLOCK_ELEMENTS` exists at a time: forward keeps each
row's log-sum-exp (combined over tiles), and backward recomputes a block's logits, turns them in
place into the gradient of the label's log-prob, and adds it into one weight gradient, or straight
into the weight's `.grad` where the trainer allows it (`allow_grad_in_place`).
"""

from __future__ import annotations

from typing import Any

import torch

# At most this many logits per block (64 MB in fp32), and no tile narrower than MIN_TILE.
BLOCK_ELEMENTS = 1 << 24
MIN_TILE = 1024
_IN_PLACE = "_dpo_cluster_head_grad_in_place"


def allow_grad_in_place(weight: torch.Tensor) -> None:
    """Let the head add its gradient of `weight` straight into `weight.grad` (made on first use)
    rather than hand autograd a (V, H) tensor to add there: no second copy on a later micro-batch
    of an accumulated step, and a tied embedding's sparse share is then added in place too
    (autograd sums a dense and a sparse gradient out of place, into a third tensor).

    Only for a trainer that reads `.grad` after backward and hooks nothing on this parameter's
    gradient (DeepSpeed without ZeRO, fp32): the head's share reaches `.grad` without passing
    through autograd's accumulation, so a gradient hook (DDP, ZeRO's reductions) would miss it.
    """
    setattr(weight, _IN_PLACE, True)


def grad_in_place(weight: torch.Tensor) -> bool:
    """Whether `allow_grad_in_place` was called on `weight`."""
    return getattr(weight, _IN_PLACE, False)


def _values_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _tiles(vocab: int, rows: int) -> list[slice]:
    width = max(MIN_TILE, BLOCK_ELEMENTS // max(rows, 1))
    return [slice(start, min(start + width, vocab)) for start in range(0, vocab, width)]


def _block_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(m, H) x a vocabulary tile -> (m, t) logits as `OutputHead.logits` computes them (fp32, or
    fp64 for fp64 weights), and tanh(z / softcap) (what backward needs to undo the cap) or None."""
    logits = torch.nn.functional.linear(hidden, weight, bias).to(_values_dtype(weight))
    if scale is not None:
        logits.mul_(scale)
    if softcap is None:
        return logits, None
    capped = logits.div_(softcap).tanh_()
    return capped * softcap, capped


def _labels_in(labels: torch.Tensor, tile: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label falls in `tile`, and those labels' columns within it."""
    rows = ((labels >= tile.start) & (labels < tile.stop)).nonzero().squeeze(1)
    return rows, labels.index_select(0, rows) - tile.start


class FusedHeadLogps(torch.autograd.Function):
    """hidden (M, H), weight (V, H), bias (V,) or None, labels (M,) -> per row: the label's log-prob
    (differentiable), the vocabulary-mean logit and WPO's aligned log-prob `logp - log sum_v p_v^2`
    (both without gradient; the latter empty unless `with_wpo`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_size: int,
        scale: float | None,
        softcap: float | None,
        with_wpo: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, vocab = hidden.shape[0], weight.shape[0]
        logps = hidden.new_zeros(rows, dtype=_values_dtype(weight))  # the label's logit, then logp
        logit_sums = torch.zeros_like(logps)
        logsumexp = torch.empty_like(logps)
        log_sum_squares = torch.empty_like(logps) if with_wpo else logps.new_empty(0)
        for start in range(0, rows, chunk_size):
            part = slice(start, start + chunk_size)
            tile_lse, tile_lse2 = [], []  # per tile: logsumexp(z), logsumexp(2 z)
            for tile in _tiles(vocab, hidden[part].shape[0]):
                bias_tile = bias[tile] if bias is not None else None
                logits, _ = _block_logits(hidden[part], weight[tile], bias_tile, scale, softcap)
                tile_lse.append(torch.logsumexp(logits, dim=-1))
                if with_wpo:
                    tile_lse2.append(torch.logsumexp(logits * 2, dim=-1))
                logit_sums[part] += logits.sum(dim=-1)
                hit, columns = _labels_in(labels[part], tile)
                logps[part].index_put_((hit,), logits[hit, columns])
            logsumexp[part] = torch.logsumexp(torch.stack(tile_lse), dim=0)
            if with_wpo:
                log_sum_squares[part] = torch.logsumexp(torch.stack(tile_lse2), dim=0) - 2 * logsumexp[part]
        logps -= logsumexp
        mean_logits = logit_sums.div_(vocab)
        wpo = logps - log_sum_squares if with_wpo else log_sum_squares
        ctx.save_for_backward(hidden, weight, bias, labels, logsumexp)
        ctx.settings = (chunk_size, scale, softcap, grad_in_place(weight))
        ctx.mark_non_differentiable(mean_logits, wpo)
        return logps, mean_logits, wpo

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logps: torch.Tensor, *_no_grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, logsumexp = ctx.saved_tensors
        chunk_size, scale, softcap, in_place = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight and in_place:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight = weight.grad
        elif need_weight:
            grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias, dtype=logsumexp.dtype) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            rows = hidden[part]
            grad = grad_logps[part].to(logsumexp.dtype).unsqueeze(1)  # (m, 1)
            hidden_acc = torch.zeros_like(rows, dtype=logsumexp.dtype) if need_hidden else None
            for tile in _tiles(weight.shape[0], rows.shape[0]):
                bias_tile = bias[tile] if bias is not None else None
                logits, capped = _block_logits(rows, weight[tile], bias_tile, scale, softcap)
                # d logp_label / d logits = onehot(label) - softmax, times the upstream gradient,
                # built in the logits' own storage.
                delta = logits.sub_(logsumexp[part].unsqueeze(1)).exp_().mul_(-grad)
                hit, columns = _labels_in(labels[part], tile)
                delta.index_put_((hit, columns), grad.squeeze(1).index_select(0, hit), accumulate=True)
                if capped is not None:  # logits = c * tanh(z / c): dz = dlogits * (1 - tanh^2)
                    delta.mul_(1 - capped.square_())
                if scale is not None:
                    delta.mul_(scale)
                if need_bias:
                    grad_bias[tile] += delta.sum(dim=0)
                delta = delta.to(weight.dtype)
                if need_hidden:  # summed over tiles in fp32 whatever the weights' dtype
                    hidden_acc += torch.mm(delta, weight[tile])
                if need_weight:
                    grad_weight[tile].addmm_(delta.t(), rows)
            if need_hidden:
                grad_hidden[part] = hidden_acc
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        if need_weight and in_place:
            grad_weight = None  # already added where the trainer reads it
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None
