"""What one generation asks for and what comes back: sampling parameters, request, result, stream delta.

Plain frozen dataclasses without torch, so the HTTP front, evaluation and the model replicas share
them, and Ray pickles them between processes unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Invalid values raise ValueError when constructed."""

    max_new_tokens: int = 128
    # 0 -> greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 1.0
    # Nucleus sampling: the smallest set of most likely tokens whose mass reaches top_p, in (0, 1].
    top_p: float = 1.0
    # Same seed + same request -> same text, whatever else is in the batch; None draws a fresh seed.
    seed: int | None = None
    # The text ends before the first of these found (the stop string itself is not returned).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            # A lone string would otherwise be read as one stop string per character.
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an int in [0, 2**64) or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: a served name, the prompt's token ids and how to sample."""

    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    # A time.time() value (wall clock, so a deadline set on one node holds on another); a row
    # still running past it ends with finish_reason "timeout".
    deadline: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    # Tokens generated, an ending EOS token included (it was generated, as the usage counts).
    completion_tokens: int
    # "stop" (EOS or a stop string) | "length" (max_new_tokens or the context) | "timeout".
    finish_reason: str


@dataclass(frozen=True)
class StreamDelta:
    # New text since the previous delta (may be "" on the last one).
    text: str
    # Set on the last delta only.
    finish_reason: str | None
    # Tokens generated so far.
    completion_tokens: int


def check_request(
    request: GenerationRequest, names: tuple[str, ...], vocab_size: int, max_context: int
) -> None:
    """Raise ValueError, in the words every backend uses, for a request naming a model not in
    `names`, with an empty prompt, a token id outside [0, vocab_size), or a prompt that leaves no
    room to generate within max_context tokens."""
    if request.model not in names:
        raise ValueError(f"unknown model {request.model!r}; this backend serves {', '.join(names)}")
    prompt = request.prompt_ids
    if not prompt:
        raise ValueError("prompt_ids must not be empty")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt_ids must be token ids in [0, {vocab_size})")
    if len(prompt) >= max_context:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens and the model's context is {max_context}: no room to generate"
        )
