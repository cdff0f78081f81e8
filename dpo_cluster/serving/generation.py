"""Text generation for the serving app: token ids in, text out, behind one small interface.

`GenerationBackend` is all the serving layer relies on, so another engine (vLLM, Ray Serve LLM)
can be added beside `TransformersBackend` later. Prompt rendering and tokenization happen before a
request gets here (`dpo_cluster.serving.prompts`).

`TransformersBackend` holds ONE copy of a causal LM's weights and serves several names from it:
the weights as they are, and any number of LoRA adapters over them (base and tuned side by side
for the A/B arena cost one base model plus the adapters' few parameters). It runs its own decode
loop rather than `model.generate`, because the rows of one batch differ in sampling parameters,
seeds, stop strings, lengths, deadlines and served name:

- the batch is left-padded and decoded one token per step with a KV cache; finished rows leave
  the batch (and the cache) at once, so a long request does not keep short ones' compute alive;
- rows of different served names run in the same forward with peft's mixed-batch LoRA inference
  (`adapter_names=[...]`, "__base__" for the bare weights);
- each sampled row draws from its own `torch.Generator`, so a seeded request gives the same text
  alone or in any batch;
- the model is shared by every thread calling in; one lock is held per forward step, not per
  call, so concurrent calls advance step by step side by side.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dpo_cluster.modeling import count_parameters, resolve_name_or_path

logger = logging.getLogger(__name__)

# peft's name for "no adapter" in a mixed batch (peft/tuners/lora/layer.py, `_mixed_batch_forward`).
BASE_ADAPTER = "__base__"
# Files whose presence means a directory carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FINISH_REASONS = ("stop", "length", "timeout")
# What an incomplete UTF-8 sequence decodes to, at the end of a partial completion.
REPLACEMENT_CHAR = "\ufffd"


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


class GenerationBackend(Protocol):
    """What the serving layer calls; every method may be called from several threads at once."""

    names: tuple[str, ...]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]: ...

    def describe(self) -> dict[str, Any]: ...


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a peft adapter directory (it has an adapter_config.json)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def has_own_tokenizer(path: str) -> bool:
    """Whether a directory carries its own tokenizer files (a training run's final/ always does;
    a bare LoRA adapter may not, and then uses its base's)."""
    return any((Path(path).expanduser() / f).is_file() for f in TOKENIZER_FILES)


def adapter_base(path: str) -> str | None:
    """The base model an adapter directory was trained over (its base_model_name_or_path), or None
    when it is not an adapter directory or does not say."""
    if not is_adapter_dir(path):
        return None
    config = _read_adapter_config(path)
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


class TransformersBackend:
    """Hugging Face transformers generation, one copy of the base weights for every served name.

    weights: a hub id, a local model directory or "builtin:tiny". names: served name -> a LoRA
    adapter directory applied over the weights, or None for the weights as they are; e.g.
    {"base": None, "tuned": "/run/final"} serves both from one copy of the base weights, and
    {"tuned": None} with weights="/run/final" serves a fully fine-tuned model.
    device: None -> "cuda" when available, else "cpu". dtype: "auto" -> bfloat16 on CUDA and
    float32 on the CPU; otherwise a torch dtype name ("float16", "bfloat16", "float32").
    Raises ValueError naming the path when the weights or an adapter cannot be loaded.
    """

    def __init__(
        self,
        weights: str,
        names: Mapping[str, str | None],
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        if not names:
            raise ValueError("names: give at least one served name")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"served names must be non-empty strings, got {name!r}")
        self.weights = weights
        self.names: tuple[str, ...] = tuple(names)
        self._adapter_paths: dict[str, str | None] = dict(names)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)

        base_path = os.path.expanduser(resolve_name_or_path(weights))
        model = _load_model(weights, base_path, revision, self.dtype, trust_remote_code).to(self.device)
        base_tokenizer = _load_tokenizer(weights, base_path, revision, trust_remote_code)
        self._config = model.config
        # Read from the bare model: a peft wrapper's forward takes **kwargs, hiding the signature.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        generation_eos = _as_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))

        # peft adapter names are internal: served names may hold dots, which module dicts refuse.
        # One adapter directory named twice is loaded once.
        adapter_of_path: dict[str, str] = {}
        self._adapter_of_name: dict[str, str] = {}
        self._tokenizers: dict[str, Any] = {}
        for name, path in self._adapter_paths.items():
            if path is None:
                self._adapter_of_name[name] = BASE_ADAPTER
                self._tokenizers[name] = base_tokenizer
                continue
            path = os.path.expanduser(path)
            if path not in adapter_of_path:
                adapter_of_path[path] = f"adapter_{len(adapter_of_path)}"
                model = _load_adapter(model, path, adapter_of_path[path], weights, base_path)
            self._adapter_of_name[name] = adapter_of_path[path]
            self._tokenizers[name] = (
                _load_tokenizer(path, path, None, trust_remote_code)
                if has_own_tokenizer(path)
                else base_tokenizer
            )
        self._mixed_batch = bool(adapter_of_path)
        model.eval()
        model.requires_grad_(False)
        self.model = model

        self._eos: dict[str, frozenset[int]] = {
            name: frozenset(_as_ids(tok.eos_token_id) | generation_eos)
            for name, tok in self._tokenizers.items()
        }
        pad = base_tokenizer.pad_token_id
        if pad is None:
            pad = base_tokenizer.eos_token_id
        # Left padding is masked out, so any id in the vocabulary does.
        self._pad_id = int(pad) if pad is not None else 0
        text_config = self._config.get_text_config()
        limit = getattr(text_config, "max_position_embeddings", None)
        # A model that states no limit (relative positions only) is bounded by memory alone.
        self._max_context = int(limit) if limit else 2**62
        self._parameters = count_parameters(model)[1]
        self._lock = threading.Lock()

    @property
    def max_context(self) -> int:
        """The most tokens, prompt and completion together, a sequence may hold."""
        return self._max_context

    def tokenizer(self, name: str) -> Any:
        """The tokenizer of served `name`: its adapter directory's own when it has one, else the
        base weights'."""
        if name not in self._tokenizers:
            raise ValueError(f"unknown model {name!r}; this backend serves {', '.join(self.names)}")
        return self._tokenizers[name]

    def describe(self) -> dict[str, Any]:
        """What is loaded: weights, served names -> adapter (or None), device, dtype and the
        total parameter count of the loaded module (base plus adapters, each counted once)."""
        return {
            "weights": self.weights,
            "names": dict(self._adapter_paths),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": self._parameters,
        }

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request `generate` would refuse, so a caller that batches
        requests can turn one away alone instead of failing its whole batch."""
        self._new_row(request, decode_each_step=False)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request in one batch; results in the order of `requests`.

        Raises ValueError, before any compute, when a request names a model not served here, has
        an empty prompt, a token id outside the vocabulary or a prompt that fills the context.
        """
        if not requests:
            return []
        decode = _Decode(self, requests, decode_each_step=False)
        while not decode.finished:
            decode.step()
        return [row.result() for row in decode.rows]

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]:
        """Generate one request, yielding text as it becomes final; the deltas' texts concatenate
        to what `generate` returns for the same request (with the same seed).

        Text that ends in an incomplete UTF-8 sequence, or that could still be the start of a stop
        string, is held back until it is settled. The last delta carries finish_reason.
        """
        decode = _Decode(self, [request], decode_each_step=True)
        row = decode.rows[0]
        stops = request.params.stop
        sent = 0
        while True:
            decode.step()
            if row.finish_reason is not None:
                yield StreamDelta(row.text[sent:], row.finish_reason, len(row.tokens))
                return
            settled = _stable_length(row.text, stops)
            if settled > sent:
                yield StreamDelta(row.text[sent:settled], None, len(row.tokens))
                sent = settled

    def _new_row(self, request: GenerationRequest, decode_each_step: bool) -> _Row:
        """Check a request and set up its decoding state."""
        if request.model not in self._tokenizers:
            raise ValueError(f"unknown model {request.model!r}; this backend serves {', '.join(self.names)}")
        prompt = tuple(request.prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids must not be empty")
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self._vocab_size for t in prompt
        ):
            raise ValueError(f"prompt_ids must be token ids in [0, {self._vocab_size})")
        if len(prompt) >= self._max_context:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and the model's context is {self._max_context}: "
                "no room to generate"
            )
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return _Row(
            request=request,
            prompt=prompt,
            tokenizer=self._tokenizers[request.model],
            eos=self._eos[request.model],
            adapter=self._adapter_of_name[request.model],
            generator=generator,
            decode_each_step=decode_each_step or bool(params.stop),
            max_context=self._max_context,
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        adapters: list[str],
    ) -> torch.Tensor:
        """One forward step over the live rows; the next-token logits, [batch, vocab] float32.

        input_ids, position_ids: [batch, new]; attention_mask: [batch, cached + new]; cache: the
        rows' DynamicCache, extended in place. adapters: each row's peft adapter (or "__base__").
        """
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": cache,
            "use_cache": True,
        }
        if self._logits_to_keep:
            # Only the last position is sampled from; the prompt's other logits are never needed.
            kwargs["logits_to_keep"] = 1
        if self._mixed_batch:
            kwargs["adapter_names"] = adapters
        # peft installs its per-row adapter hooks on the shared modules for the length of one
        # forward, so forwards must not overlap; holding the lock per step (not per call) lets
        # concurrent calls take turns step by step.
        with self._lock:
            logits = self.model(**kwargs).logits
        return logits[:, -1, :].float()

    def _decode_text(self, row: _Row) -> str:
        """The row's completion so far as text, special tokens skipped and an ending EOS dropped
        (an EOS from generation_config need not be a special token of the tokenizer)."""
        tokens = row.tokens[:-1] if row.ended_on_eos else row.tokens
        return row.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass(eq=False)
class _Row:
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

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(self.text, len(self.prompt), len(self.tokens), self.finish_reason)


class _Decode:
    """One batch being decoded: the rows still running, their KV cache and next inputs.

    `step` runs one forward for every live row and appends one token to each; rows that finish
    leave the batch tensors and the cache before the next step.
    """

    def __init__(
        self, backend: TransformersBackend, requests: Sequence[GenerationRequest], *, decode_each_step: bool
    ) -> None:
        self.backend = backend
        # Every request is checked before any compute, so one bad request fails the call cleanly.
        self.rows = [backend._new_row(r, decode_each_step) for r in requests]
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
                self._finish(row, "timeout")
        # Grad mode is per thread, and a stream's consumer runs between steps: enter it per step.
        with torch.inference_mode():
            self._drop_finished()
            if not self.live:
                return
            if self.cache is None:
                self._prefill_inputs()
            assert self.input_ids is not None and self.attention_mask is not None
            assert self.position_ids is not None
            logits = self.backend._forward(
                self.input_ids,
                self.attention_mask,
                self.position_ids,
                self.cache,
                [row.adapter for row in self.live],
            )
            tokens = _sample(logits, self.live)
            for row, token in zip(self.live, tokens.tolist()):
                self._advance(row, token)
            batch = len(self.live)
            self.input_ids = tokens[:, None]
            ones = self.attention_mask.new_ones(batch, 1)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
            self.position_ids = self.position_ids[:, -1:] + 1
            self._drop_finished()

    def _prefill_inputs(self) -> None:
        """Left-pad the live rows' prompts into the first step's inputs and start their cache."""
        from transformers.cache_utils import DynamicCache

        device = self.backend.device
        width = max(len(row.prompt) for row in self.live)
        ids = torch.full((len(self.live), width), self.backend._pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.live), width), dtype=torch.long)
        for i, row in enumerate(self.live):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            mask[i, width - len(row.prompt) :] = 1
        self.input_ids = ids.to(device)
        self.attention_mask = mask.to(device)
        # Each row's positions start at 0 at its first real token, whatever its padding; the
        # padding's own positions are never attended to.
        self.position_ids = (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        # With the config, the cache builds the layer types the model has (sliding window too).
        self.cache = DynamicCache(config=self.backend._config)

    def _advance(self, row: _Row, token: int) -> None:
        """Append a generated token to a row and end it when it is done."""
        row.tokens.append(token)
        if token in row.eos:
            row.ended_on_eos = True
            self._finish(row, "stop")
            return
        if row.decode_each_step:
            text = self.backend._decode_text(row)
            cut = _first_stop(text, row.request.params.stop)
            if cut is not None:
                row.text = text[:cut]
                row.finish_reason = "stop"
                return
            row.text = text
        if len(row.tokens) >= row.request.params.max_new_tokens:
            self._finish(row, "length")
        elif len(row.prompt) + len(row.tokens) >= row.max_context:
            # The next token would sit past the last position the model has.
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str) -> None:
        row.text = self.backend._decode_text(row)
        row.finish_reason = reason

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
        index = torch.tensor(keep, dtype=torch.long, device=self.backend.device)
        self.cache.batch_select_indices(index)
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]


def _sample(logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
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


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _stable_length(text: str, stops: Sequence[str]) -> int:
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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA, float32 elsewhere; otherwise the torch dtype of that name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    return resolved


def _as_ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.isabs(name)


def _load_model(
    weights: str, path: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool
) -> Any:
    from transformers import AutoModelForCausalLM

    if _looks_like_path(path) and not Path(path).is_dir():
        # Spelled as a path, so not a hub id: say so, rather than the hub's repo-id complaint.
        raise ValueError(f"could not load weights {weights!r}: no such local directory")
    if is_adapter_dir(path):
        raise ValueError(
            f"could not load weights {weights!r}: it is a LoRA adapter directory; pass its base model "
            f"({adapter_base(path)!r}) as the weights and the adapter in names"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not load weights {weights!r}: {exc}") from exc


def _load_tokenizer(name: str, path: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load the tokenizer of {name!r}: {exc}") from exc


def _read_adapter_config(path: str) -> dict[str, Any]:
    config_path = Path(path).expanduser() / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read adapter {path!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"could not read adapter {path!r}: adapter_config.json is not an object")
    return config


def _load_adapter(model: Any, path: str, adapter_name: str, weights: str, base_path: str) -> Any:
    """`model` with the LoRA adapter at `path` added as `adapter_name` (wrapped in a PeftModel on
    the first adapter); ValueError naming the path when it cannot be loaded over these weights."""
    from peft import PeftModel

    if not is_adapter_dir(path):
        raise ValueError(f"could not load adapter {path!r}: not a directory with an adapter_config.json")
    config = _read_adapter_config(path)
    # Mixed-batch inference (rows of several adapters in one forward) is a LoRA feature, and peft
    # 0.21 refuses it for DoRA.
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(
            f"could not load adapter {path!r}: only plain LoRA adapters can be served "
            f"(peft_type {config.get('peft_type')!r}, use_dora {bool(config.get('use_dora'))})"
        )
    base = config.get("base_model_name_or_path")
    if base and not _same_model(base, weights, base_path):
        # A different name can still be the same weights (a copy, a hub id vs its download), so
        # this alone only warns; mismatched shapes fail the load below.
        logger.warning("adapter %s was trained over %r; serving it over %r", path, base, weights)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=adapter_name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"could not load adapter {path!r} over weights {weights!r}: {_brief(exc)}") from exc
    return model


def _brief(exc: BaseException, lines: int = 3) -> str:
    """The first lines of an error: a shape mismatch lists every tensor of the model otherwise."""
    text = str(exc).splitlines()
    return "\n".join(text[:lines]) + (f"\n... ({len(text) - lines} more lines)" if len(text) > lines else "")


def _same_model(base: str, weights: str, base_path: str) -> bool:
    if base in (weights, base_path):
        return True
    base_dir = Path(base).expanduser()
    if base_dir.is_dir() and Path(base_path).is_dir():
        return base_dir.resolve() == Path(base_path).resolve()
    return False
