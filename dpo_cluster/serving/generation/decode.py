"""The batched decode loop: rows that differ in sampling, seeds, stops, lengths and deadlines, together.

`model.generate` takes one set of parameters per batch, so the backend steps its own loop: the
batch is left-padded and decoded one token per step with a KV cache; finished rows leave the batch
(and the cache) at once, so a long request does not keep short ones' compute alive; each sampled
row draws from its own `torch.Generator`, so a seeded request gives the same text alone or in any
batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_cluster.serving.generation.request import GenerationRequest, GenerationResult

# What an incomplete UTF-8 sequence decodes to, at the end of a partial completion.
REPLACEMENT_CHAR = "\ufffd"

# One forward step: (input_ids [batch, new], attention_mask [batch, cached + new],
# position_ids [batch, new], cache, each row's adapter) -> next-token logits [batch, vocab] float32.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[str]], torch.Tensor]


@dataclass(eq=False)
class Row:
    """The decoding state of one request."""

    request: GenerationRequest
    prompt: tuple[int, ...]
    tokenizer: Any
    eos: frozenset[int]
    adapter: str
    generator: torch.Generator | None
    # Decode the text after every token (for stop strings and streaming), or only at the end.
    decode_each_step: bool
    max_context: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ended_on_eos: bool = False

    def decoded_text(self) -> str:
        """The completion so far as text, special tokens skipped and an ending EOS dropped (an EOS
        from generation_config need not be a special token of the tokenizer)."""
        tokens = self.tokens[:-1] if self.ended_on_eos else self.tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def finish(self, reason: str) -> None:
        self.text = self.decoded_text()
        self.finish_reason = reason

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(self.text, len(self.prompt), len(self.tokens), self.finish_reason)


class Decode:
    """One batch being decoded: the rows still running, their KV cache and next inputs.

    `step` runs one forward for every live row and appends one token to each; rows that finish
    leave the batch tensors and the cache before the next step. `config` is the model's config,
    from which the cache builds the layer types the model has (sliding window too).
    """

    def __init__(
        self, rows: Sequence[Row], forward: Forward, *, pad_id: int, device: torch.device, config: Any
    ) -> None:
        self.rows = list(rows)
        self.forward = forward
        self.pad_id = pad_id
        self.device = device
        self.config = config
        # The rows still decoding, in the order of the batch tensors below.
        self.live = list(self.rows)
        self.cache: Any = None
        self.input_ids: torch.Tensor | None = None  # [live, new]
        self.attention_mask: torch.Tensor | None = None  # [live, cached + new]
        self.position_ids: torch.Tensor | None = None  # [live, new]

    @property
    def finished(self) -> bool:
        return not self.live

    def step(self) -> None:
        """Advance every live row by one token (or end it by its deadline)."""
        now = time.time()
        for row in self.live:
            deadline = row.request.deadline
            if deadline is not None and now >= deadline:
                row.finish("timeout")
        # Grad mode is per thread, and a stream's consumer runs between steps: enter it per step.
        with torch.inference_mode():
            self._drop_finished()
            if not self.live:
                return
            if self.cache is None:
                self._prefill_inputs()
            assert self.input_ids is not None and self.attention_mask is not None
            assert self.position_ids is not None
            logits = self.forward(
                self.input_ids,
                self.attention_mask,
                self.position_ids,
                self.cache,
                [row.adapter for row in self.live],
            )
            tokens = sample_tokens(logits, self.live)
            for row, token in zip(self.live, tokens.tolist()):
                _advance(row, token)
            batch = len(self.live)
            self.input_ids = tokens[:, None]
            ones = self.attention_mask.new_ones(batch, 1)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
            self.position_ids = self.position_ids[:, -1:] + 1
            self._drop_finished()

    def _prefill_inputs(self) -> None:
        """Left-pad the live rows' prompts into the first step's inputs and start their cache."""
        from transformers.cache_utils import DynamicCache

        width = max(len(row.prompt) for row in self.live)
        ids = torch.full((len(self.live), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.live), width), dtype=torch.long)
        for i, row in enumerate(self.live):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            mask[i, width - len(row.prompt) :] = 1
        self.input_ids = ids.to(self.device)
        self.attention_mask = mask.to(self.device)
        # Each row's positions start at 0 at its first real token, whatever its padding; the
        # padding's own positions are never attended to.
        self.position_ids = (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.config)

    def _drop_finished(self) -> None:
        """Take finished rows out of the batch tensors and the cache."""
        keep = [i for i, row in enumerate(self.live) if row.finish_reason is None]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[i] for i in keep]
        if self.cache is None or not keep:
            return
        assert self.input_ids is not None and self.attention_mask is not None
        assert self.position_ids is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]


def _advance(row: Row, token: int) -> None:
    """Append a generated token to a row and end it when it is done."""
    row.tokens.append(token)
    if token in row.eos:
        row.ended_on_eos = True
        row.finish("stop")
        return
    if row.decode_each_step:
        text = row.decoded_text()
        cut = first_stop(text, row.request.params.stop)
        if cut is not None:
            row.text = text[:cut]
            row.finish_reason = "stop"
            return
        row.text = text
    if len(row.tokens) >= row.request.params.max_new_tokens:
        row.finish("length")
    elif len(row.prompt) + len(row.tokens) >= row.max_context:
        # The next token would sit past the last position the model has.
        row.finish("length")


def sample_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """The next token of each row, [batch] long, from next-token logits [batch, vocab] float32.

    Temperature 0 rows take the argmax. The others sample from softmax(logits / temperature),
    restricted to their top_p nucleus, with their own generator, so a row's draw depends on its
    seed and its logits alone, not on the other rows of the batch.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.request.params.temperature > 0]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    temperature = torch.tensor(
        [rows[i].request.params.temperature for i in sampled], dtype=logits.dtype, device=logits.device
    )
    # top_p 1 keeps everything: no filter, rather than one that float rounding in the cumulative
    # sum could make drop the least likely tokens.
    top_p = torch.tensor(
        [p if (p := rows[i].request.params.top_p) < 1 else math.inf for i in sampled],
        dtype=logits.dtype,
        device=logits.device,
    )
    probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # A token stays when the mass of the tokens before it is still short of top_p: the smallest
    # prefix that reaches top_p, and always the most likely token.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    for j, i in enumerate(sampled):
        tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return tokens


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def stable_length(text: str, stops: Sequence[str]) -> int:
    """How much of a partial completion is final: all of it, less a tail of replacement characters
    (an incomplete UTF-8 sequence, completed by the next token) and less a tail that could be the
    start of a stop string (which would be cut away)."""
    end = len(text)
    while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.startswith(stop[:k], end - k):
                hold = k
                break
    return end - hold
