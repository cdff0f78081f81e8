"""`TransformersBackend`: one copy of a causal LM's weights serving several names, batched.

The names are the weights as they are and any number of LoRA adapters over them, so base and
tuned side by side cost one base model plus the adapters' few parameters: rows of different names
run in the same forward with peft's mixed-batch LoRA inference (`adapter_names=[...]`). The model
is shared by every thread calling in; one lock is held per forward step, not per call, so
concurrent calls advance step by step side by side.
"""

from __future__ import annotations

import inspect
import os
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from dpo_cluster.modeling import count_parameters, resolve_name_or_path
from dpo_cluster.serving.generation.decode import Decode, Row, stable_length
from dpo_cluster.serving.generation.request import (
    GenerationRequest,
    GenerationResult,
    StreamDelta,
    check_request,
)
from dpo_cluster.serving.generation.weights import (
    add_adapter,
    as_token_ids,
    has_own_tokenizer,
    load_tokenizer_of,
    load_weights,
    resolve_dtype,
)

# peft's name for "no adapter" in a mixed batch (peft/tuners/lora/layer.py, `_mixed_batch_forward`).
BASE_ADAPTER = "__base__"


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
        model = load_weights(weights, base_path, revision, self.dtype, trust_remote_code).to(self.device)
        base_tokenizer = load_tokenizer_of(weights, base_path, revision, trust_remote_code)
        self._config = model.config
        # Read from the bare model: a peft wrapper's forward takes **kwargs, hiding the signature.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        generation_eos = as_token_ids(
            getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        )

        model = self._load_adapters(model, base_tokenizer, base_path, trust_remote_code)
        model.eval()
        model.requires_grad_(False)
        self.model = model

        self._eos: dict[str, frozenset[int]] = {
            name: frozenset(as_token_ids(tok.eos_token_id) | generation_eos)
            for name, tok in self._tokenizers.items()
        }
        pad = base_tokenizer.pad_token_id
        if pad is None:
            pad = base_tokenizer.eos_token_id
        # Left padding is masked out, so any id in the vocabulary does.
        self._pad_id = int(pad) if pad is not None else 0
        limit = getattr(self._config.get_text_config(), "max_position_embeddings", None)
        # A model that states no limit (relative positions only) is bounded by memory alone.
        self._max_context = int(limit) if limit else 2**62
        self._parameters = count_parameters(model)[1]
        self._lock = threading.Lock()

    def _load_adapters(self, model: Any, base_tokenizer: Any, base_path: str, trust_remote_code: bool) -> Any:
        """`model` with every served name's adapter added; sets each name's peft adapter and tokenizer.

        peft adapter names are internal ("adapter_0", ...): served names may hold dots, which module
        dicts refuse. One adapter directory named twice is loaded once.
        """
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
                model = add_adapter(model, path, adapter_of_path[path], self.weights, base_path)
            self._adapter_of_name[name] = adapter_of_path[path]
            self._tokenizers[name] = (
                load_tokenizer_of(path, path, None, trust_remote_code)
                if has_own_tokenizer(path)
                else base_tokenizer
            )
        self._mixed_batch = bool(adapter_of_path)
        return model

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
            "backend": "hf",
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
        decode = self._start(requests, decode_each_step=False)
        while not decode.finished:
            decode.step()
        return [row.result() for row in decode.rows]

    def stream(self, request: GenerationRequest) -> Iterator[StreamDelta]:
        """Generate one request, yielding text as it becomes final; the deltas' texts concatenate
        to what `generate` returns for the same request (with the same seed).

        Text that ends in an incomplete UTF-8 sequence, or that could still be the start of a stop
        string, is held back until it is settled. The last delta carries finish_reason.
        """
        decode = self._start([request], decode_each_step=True)
        row = decode.rows[0]
        stops = request.params.stop
        sent = 0
        while True:
            decode.step()
            if row.finish_reason is not None:
                yield StreamDelta(row.text[sent:], row.finish_reason, len(row.tokens))
                return
            settled = stable_length(row.text, stops)
            if settled > sent:
                yield StreamDelta(row.text[sent:settled], None, len(row.tokens))
                sent = settled

    def _start(self, requests: Sequence[GenerationRequest], *, decode_each_step: bool) -> Decode:
        # Every request is checked before any compute, so one bad request fails the call cleanly.
        rows = [self._new_row(r, decode_each_step) for r in requests]
        return Decode(rows, self._forward, pad_id=self._pad_id, device=self.device, config=self._config)

    def _new_row(self, request: GenerationRequest, decode_each_step: bool) -> Row:
        """Check a request and set up its decoding state."""
        check_request(request, self.names, self._vocab_size, self._max_context)
        prompt = tuple(request.prompt_ids)
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return Row(
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
