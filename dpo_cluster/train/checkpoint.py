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


def trainable_only(config: Config) -> bool:
    """Whether checkpoints hold the trainable weights alone: with LoRA the frozen base is the
    model.name_or_path the run starts from, so saving it again at every step only costs disk and
    copies (the whole base model per checkpoint, per node that reads it)."""
    return config.lora.enabled


def drop_tied_frozen_weights(engine: Any) -> None:
    """Make the engine's trainable-only checkpoints leave out tied frozen weights too.

    DeepSpeed drops frozen weights by `named_parameters()`, which names a tied weight once, so
    the second name of a tied pair (lm_head.weight beside embed_tokens.weight) stays: with
    LoRA on a tied model that is the largest matrix of the base. This engine's
    `module_state_dict` then drops every frozen name, tied ones included."""
    plain = engine.module_state_dict

    def module_state_dict(
        *args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        state = plain(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


def save_state(
    engine: Any, directory: Path, *, rank: int, config: Config, client_state: dict[str, Any]
) -> None:
    """Collective: every rank calls it with its own (local) directory."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(directory),
        tag=STATE_TAG,
        client_state=client_state,
        exclude_frozen_parameters=trainable_only(config),
    )
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")


def load_state(
    engine: Any, directory: Path, *, rank: int, config: Config, weights_only: bool = False
) -> dict[str, Any]:
    """Collective: restore engine state (and this rank's RNG); returns the saved client_state.
    weights_only loads the module weights alone (picking the best checkpoint for export). A
    trainable-only checkpoint loads over the frozen weights the engine already holds."""
    _, client_state = engine.load_checkpoint(
        str(directory),
        tag=STATE_TAG,
        load_module_strict=not trainable_only(config),
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
    as safetensors or, with LoRA, the adapter, plus the tokenizer, the resolved config
    (dpo_config.yaml) and metrics_summary.json. With lora.merge_on_save the adapter goes to
    `adapter_dir(out_dir)` for `merge_final` to fold into the base once the workers are done."""
    if config.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # full dict on rank 0 only
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model = engine.module
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    merging = config.lora.enabled and config.lora.merge_on_save
    model.save_pretrained(
        adapter_dir(out_dir) if merging else out_dir, state_dict=state_dict, safe_serialization=True
    )
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


def adapter_dir(out_dir: Path) -> Path:
    """Where the adapter waits for `merge_final` beside `out_dir`."""
    return out_dir.with_name(out_dir.name + ".adapter")


def merge_final(config: Config, out_dir: Path) -> None:
    """Rank 0, after the workers' last collective: with lora.merge_on_save, load the base with the
    exported adapter, merge, write the full model into `out_dir`. Merging a 7B base takes minutes
    on the host; done before the final barrier, the other workers would wait on it and could pass
    the process group's timeout (scaling.timeout_s)."""
    if not (config.lora.enabled and config.lora.merge_on_save):
        return
    from peft import AutoPeftModelForCausalLM

    adapter = adapter_dir(out_dir)
    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(adapter, ignore_errors=True)
