"""Text generation for the serving app: token ids in, text out, several served names per model copy.

`TransformersBackend` (backend) holds one copy of a model's weights and serves the bare weights
and LoRA adapters over them, batched by its own decode loop (decode); `request` holds what a
generation asks for and returns, `weights` loads models, tokenizers and adapters. The names are
re-exported here because the model replicas, the front and evaluation all import them from one
place. Prompts are rendered into token ids before they get here (`dpo_cluster.serving.prompts`).
"""

from dpo_cluster.serving.generation.backend import TransformersBackend
from dpo_cluster.serving.generation.request import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
)
from dpo_cluster.serving.generation.weights import (
    adapter_base,
    has_own_tokenizer,
    is_adapter_dir,
    resolve_dtype,
)

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "StreamDelta",
    "TransformersBackend",
    "adapter_base",
    "has_own_tokenizer",
    "is_adapter_dir",
    "resolve_dtype",
]
