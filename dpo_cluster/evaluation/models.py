"""The base and tuned models of an evaluation, loaded once for generation and log-probs alike.

A tuned LoRA adapter is held as the serve app holds it: one backend with the base weights once,
answering and scoring as "base" (adapter off, also the DPO reference, since a LoRA policy starts
from its base) and "tuned" (adapter on). A full tuned model gets a backend of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.modeling import reference_context
from dpo_cluster.serving.generation import TransformersBackend, is_adapter_dir

BASE, TUNED = "base", "tuned"


@dataclass
class EvalModels:
    """Base and tuned behind their generation backends (one shared backend for an adapter)."""

    base: str
    tuned: str
    tuned_is_adapter: bool
    # "base" / "tuned" -> the backend serving that name; the same object when tuned is an adapter.
    backends: dict[str, TransformersBackend]

    @property
    def device(self) -> torch.device:
        return self.backends[TUNED].device

    def tokenizer(self, name: str) -> Any:
        """The tokenizer the serve app would use for `name` (an adapter's own, when it has one)."""
        return self.backends[name].tokenizer(name)

    def policy_logps(self, chunk_size: int = 0) -> Callable[[MicroBatch], torch.Tensor]:
        """Summed completion log-probs (2B,) of a micro-batch under the tuned model, as training's
        `sequence_logps` computes them (`chunk_size`: train.logps_chunk_size)."""
        model = self.backends[TUNED].model

        def score(batch: MicroBatch) -> torch.Tensor:
            return sequence_logps(model, batch, chunk_size=chunk_size)[0]

        return score

    def reference_logps(self, chunk_size: int = 0) -> Callable[[MicroBatch], torch.Tensor]:
        """As `policy_logps` under the reference: the base model, or for an adapter the tuned
        module with its adapter switched off, under no_grad either way."""
        model, mode = (
            (self.backends[TUNED].model, "adapter_disabled")
            if self.tuned_is_adapter
            else (self.backends[BASE].model, "model")
        )

        def score(batch: MicroBatch) -> torch.Tensor:
            with reference_context(model, mode):
                return sequence_logps(model, batch, chunk_size=chunk_size)[0]

        return score

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "tuned": self.tuned,
            "tuned_kind": "lora_adapter" if self.tuned_is_adapter else "full_model",
            "device": str(self.device),
            "dtype": str(self.backends[TUNED].dtype).removeprefix("torch."),
        }


def load_eval_models(
    base: str,
    tuned: str,
    *,
    device: str | None = None,
    dtype: str = "auto",
    base_revision: str | None = None,
    trust_remote_code: bool = False,
) -> EvalModels:
    """Load base and tuned: one backend {"base": None, "tuned": adapter} when `tuned` is a LoRA
    adapter directory, else a backend each. Raises ValueError naming the path that failed."""
    options: dict[str, Any] = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if is_adapter_dir(tuned):
        shared = TransformersBackend(base, {BASE: None, TUNED: tuned}, revision=base_revision, **options)
        return EvalModels(base, tuned, True, {BASE: shared, TUNED: shared})
    base_backend = TransformersBackend(base, {BASE: None}, revision=base_revision, **options)
    tuned_backend = TransformersBackend(tuned, {TUNED: None}, **options)
    return EvalModels(base, tuned, False, {BASE: base_backend, TUNED: tuned_backend})
