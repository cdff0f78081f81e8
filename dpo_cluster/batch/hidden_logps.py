"""Completion log-probs straight from the final hidden states, a chunk of tokens at a time.

At a 150k vocabulary the (2B, T, V) logits and their gradient are the largest tensors of a DPO
step. Here the model runs with `logits_to_keep=1`, its final hidden states are caught by a hook on
its decoder, and only completion positions meet the output head, `chunk_size` of them at a time
with their logits recomputed in backward: one chunk's logits exist at a time. A plain linear head
goes through `fused_head` (one weight gradient for all chunks); any other head (LoRA-adapted, or
partitioned by ZeRO-3) is called as a module under activation checkpointing, so peft's and
DeepSpeed's own forward logic applies. Where the trainer lets the head add into `.grad`, a tied
input embedding gives its share of the weight gradient as a sparse (tokens, H) tensor rather
than a second dense (V, H) one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dpo_cluster.batch.fused_head import FusedHeadLogps, grad_in_place
from dpo_cluster.logprobs import log_sum_squared_probs

TURN_OFF = "set train.logps_chunk_size: 0 to score from the model's full logits instead"


@dataclass(frozen=True)
class OutputHead:
    """Where a causal LM's final hidden states come from and how they become logits.

    decoder: the module whose output's first element (or `last_hidden_state`) is the final,
        normalised hidden state the head reads, (N, L, H).
    head: hidden (m, H) -> logits (m, V): the model's output embeddings (LoRA-wrapped if adapted).
    logit_scale / softcap: the model's own post-processing of the head's output (Cohere's scale,
        Gemma 2's tanh soft-capping), applied as its forward does; None where it has none.
    tied_embedding: the input embedding when it is a plain `nn.Embedding` sharing the head's
        weight, else None.
    """

    decoder: torch.nn.Module
    head: torch.nn.Module
    logit_scale: float | None = None
    softcap: float | None = None
    tied_embedding: torch.nn.Embedding | None = None

    @property
    def fused(self) -> bool:
        """Whether the head is a plain, unpartitioned `nn.Linear`, scored by `FusedHeadLogps`."""
        return type(self.head) is torch.nn.Linear and not _partitioned(self.head.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(m, H) hidden -> (m, V) fp32 logits, as the model's forward computes them then upcast."""
        logits = self.head(hidden).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: its data lives in shards outside its module's forward."""
    return hasattr(param, "ds_id")


def _unwrap(model: object) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine, DDP and/or a peft model."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model"):  # peft PeftModel
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):  # DeepSpeed engine, DDP
            inner = inner.module
        else:
            break
    if not isinstance(inner, torch.nn.Module):
        raise ValueError(
            f"log-probs from hidden states need the model as a module, got {type(model).__name__}"
        )
    return inner


def find_output_head(model: object) -> OutputHead:
    """The decoder and output head of a causal LM (possibly wrapped); ValueError when not found."""
    inner = _unwrap(model)
    name = type(inner).__name__
    get_head = getattr(inner, "get_output_embeddings", None)
    get_decoder = getattr(inner, "get_decoder", None)
    head = get_head() if callable(get_head) else None
    decoder = get_decoder() if callable(get_decoder) else None
    if head is None or decoder is None or decoder is inner:
        raise ValueError(
            f"cannot find the output head and decoder of {name} (get_output_embeddings / "
            f"get_decoder) to compute log-probs from its hidden states; {TURN_OFF}"
        )
    config = getattr(inner, "config", None)
    scale = getattr(inner, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    get_embedding = getattr(inner, "get_input_embeddings", None)
    embedding = get_embedding() if callable(get_embedding) else None
    tied = (
        embedding
        if type(embedding) is torch.nn.Embedding and embedding.weight is getattr(head, "weight", None)
        else None
    )
    return OutputHead(decoder, head, float(scale) if scale is not None else None, softcap or None, tied)


@contextmanager
def _sparse_lookup_gradient(head: OutputHead) -> Iterator[None]:
    """While a forward under grad runs, make the tied embedding's lookup give a sparse gradient,
    where the head adds its share straight into `.grad` (`fused_head.allow_grad_in_place`).

    The head's backward runs first and leaves `.grad` dense (it makes it if missing, even for no
    rows); autograd then adds the lookup's (tokens, H) share into it in place, so no dense (V, H)
    tensor is made for the lookup, nor one to sum the two shares in.
    """
    embedding = head.tied_embedding
    if (
        embedding is None
        or embedding.sparse
        or not head.fused
        or not grad_in_place(embedding.weight)
        or not torch.is_grad_enabled()
        or not embedding.weight.requires_grad
    ):
        yield
        return
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = False


def forward_hidden(
    forward: Callable[..., object], head: OutputHead, inputs: dict[str, object]
) -> torch.Tensor:
    """Run `forward(**inputs)` keeping one position's logits; -> the final hidden states (N, L, H).

    Under grad, a loss built on these states must score them through `head_row_values`: a tied
    embedding's lookup gradient is then sparse (see `_sparse_lookup_gradient`).
    """
    caught: list[torch.Tensor] = []

    def catch(_module: torch.nn.Module, _args: object, output: object) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)):
            hidden = output[0]
        caught.append(hidden)  # type: ignore[arg-type]

    handle = head.decoder.register_forward_hook(catch)
    try:
        with _sparse_lookup_gradient(head):
            forward(**inputs, logits_to_keep=1)
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        raise ValueError(
            f"the model's forward takes no logits_to_keep argument ({error}); {TURN_OFF}"
        ) from None
    finally:
        handle.remove()
    if len(caught) != 1 or not isinstance(caught[0], torch.Tensor) or caught[0].dim() != 3:
        raise ValueError(
            f"the decoder {type(head.decoder).__name__} ran {len(caught)} time(s) without giving one "
            f"(N, L, H) hidden state; {TURN_OFF}"
        )
    return caught[0]


@dataclass
class RowValues:
    """Per scored position, (M,) fp32 each: label log-prob (with the forward's gradient), the
    vocabulary-mean logit, and WPO's aligned log-prob (`logprobs.compute_wpo_token_logps`) or None."""

    logps: torch.Tensor
    mean_logits: torch.Tensor
    wpo_logps: torch.Tensor | None


def _chunk_values(
    head: OutputHead, with_wpo: bool, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    logits = head.logits(hidden)  # (m, V) fp32
    logsumexp = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - logsumexp
    with torch.no_grad():
        mean_logits = logits.mean(dim=-1)
        if not with_wpo:
            return logps, mean_logits
        return logps, mean_logits, logps.detach() - log_sum_squared_probs(logits, logsumexp)


def head_row_values(
    head: OutputHead,
    hidden_rows: torch.Tensor,
    row_labels: torch.Tensor,
    *,
    chunk_size: int,
    with_wpo: bool = False,
) -> RowValues:
    """Log-probs of `row_labels` (M,) under the head at `hidden_rows` (M, H), `chunk_size` rows at
    a time; each chunk's logits are recomputed in backward instead of kept (`FusedHeadLogps` for a
    plain linear head, activation checkpointing otherwise), except under ZeRO-3 (see below).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if head.fused:
        linear = head.head
        logps, mean_logits, wpo = FusedHeadLogps.apply(
            hidden_rows,
            linear.weight,
            linear.bias,
            row_labels,
            chunk_size,
            head.logit_scale,
            head.softcap,
            with_wpo,
        )
        return RowValues(logps, mean_logits, wpo if with_wpo else None)
    params = list(head.head.parameters())
    # Under ZeRO-3 the head's weight is partitioned outside its module's forward, and a chunk
    # recomputed inside backward would find it released: there each chunk keeps its logits for
    # backward (still completion positions only), and DeepSpeed gathers the weight for backward
    # as in the model's own forward.
    recompute = (
        torch.is_grad_enabled()
        and not any(_partitioned(p) for p in params)
        and (hidden_rows.requires_grad or any(p.requires_grad for p in params))
    )
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        args = (
            head,
            with_wpo,
            hidden_rows[start : start + chunk_size],
            row_labels[start : start + chunk_size],
        )
        parts.append(
            checkpoint(_chunk_values, *args, use_reentrant=False) if recompute else _chunk_values(*args)
        )
    if not parts:
        empty = hidden_rows.new_zeros(0, dtype=torch.float32)
        return RowValues(empty, empty, empty if with_wpo else None)
    columns = [torch.cat(values) for values in zip(*parts)]
    return RowValues(columns[0], columns[1], columns[2] if with_wpo else None)
