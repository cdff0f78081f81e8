"""Checkpoints (DeepSpeed engine state under the tag "state", the loop's `client_state`, one
`rng_rank{R}.pt` per worker) and the final export in Hugging Face format. The RNG files make a
resumed run draw the same random numbers (dropout) as the uninterrupted one. Every worker writes
its own files; Ray Train merges them into one directory.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dpo_cluster.config import Config
from dpo_cluster.data.tokenize import chat_template_override

STATE_TAG = "state"

# final/ holds the run's summary: steps, epochs, precision, the last training and evaluation metrics.
SUMMARY_FILE = "metrics_summary.json"


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_state(engine: Any, directory: Path, *, rank: int, client_state: dict[str, Any]) -> None:
    """Collective: every rank calls it with its own (local) directory."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=STATE_TAG, client_state=client_state)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")


def load_state(engine: Any, directory: Path, *, rank: int, weights_only: bool = False) -> dict[str, Any]:
    """Collective: restore engine state (and this rank's RNG); returns the saved client_state.
    weights_only loads the module weights alone (picking the best checkpoint for export)."""
    _, client_state = engine.load_checkpoint(
        str(directory),
        tag=STATE_TAG,
        load_module_only=weights_only,
        load_optimizer_states=not weights_only,
        load_lr_scheduler_states=not weights_only,
    )
    rng_file = directory / f"rng_rank{rank}.pt"
    if not weights_only and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(client_state or {})


def export_final(
    engine: Any,
    tokenizer: Any,
    config: Config,
    out_dir: Path,
    *,
    rank: int,
    metrics_summary: dict[str, Any],
) -> None:
    """Collective under ZeRO-3 (the weights are gathered); rank 0 writes `out_dir`: the full model
    as safetensors or, with LoRA, the adapter (merged into the base with lora.merge_on_save), plus
    the tokenizer, the resolved config (dpo_config.yaml) and metrics_summary.json."""
    if config.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # full dict on rank 0 only
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model = engine.module
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if config.lora.enabled and config.lora.merge_on_save:
        adapter_dir = out_dir.with_name(out_dir.name + ".adapter")
        model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        _merge_adapter(adapter_dir, out_dir)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    # The tokenizer keeps the chat template the pairs were rendered with (a configured one, or
    # the plain fallback for a tokenizer without one), so serving and evaluation format prompts
    # exactly as training did.
    template = chat_template_override(tokenizer, config.data.tokenize_spec().chat_template)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    (out_dir / "dpo_config.yaml").write_text(
        yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    )
    (out_dir / SUMMARY_FILE).write_text(json.dumps(metrics_summary, indent=2) + "\n")


def _merge_adapter(adapter_dir: Path, out_dir: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
