"""Loading what a generation backend serves: base weights, tokenizers, LoRA adapters over them.

Every failure is a ValueError naming the path at fault, so a bad serve config is reported as the
directory it names rather than as a deep transformers or peft traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpo_cluster.paths import looks_local

logger = logging.getLogger(__name__)

# Files whose presence means a directory carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    config = read_adapter_config(path)
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def as_token_ids(value: int | Sequence[int] | None) -> set[int]:
    """An eos_token_id as a config states it (one id, a list, or none) as a set of ids."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA, float32 elsewhere; otherwise the torch dtype of that name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    return resolved


def load_weights(
    weights: str, path: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool
) -> Any:
    """The causal LM at `path` (`weights` resolved), in `dtype`."""
    from transformers import AutoModelForCausalLM

    if looks_local(path) and not Path(path).is_dir():
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


def load_tokenizer_of(name: str, path: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer at `path`; errors name `name`, the model it belongs to."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load the tokenizer of {name!r}: {exc}") from exc


def read_adapter_config(path: str) -> dict[str, Any]:
    config_path = Path(path).expanduser() / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read adapter {path!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"could not read adapter {path!r}: adapter_config.json is not an object")
    return config


def add_adapter(model: Any, path: str, adapter_name: str, weights: str, base_path: str) -> Any:
    """`model` with the LoRA adapter at `path` added as `adapter_name` (wrapped in a PeftModel on
    the first adapter); ValueError naming the path when it cannot be loaded over these weights."""
    from peft import PeftModel

    if not is_adapter_dir(path):
        raise ValueError(f"could not load adapter {path!r}: not a directory with an adapter_config.json")
    config = read_adapter_config(path)
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
