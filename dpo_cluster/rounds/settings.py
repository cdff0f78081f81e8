"""The configs a round derives from the user's: its training run (DPO on the round's pairs, from
the current policy, against the base or the previous policy) and its evaluations (the new policy
against the base and against the previous one on the held-out prompts).

Everything else (loss, LoRA, DeepSpeed, scaling, sampling of the evaluation, its judge) is the
user's, so a round trains and evaluates exactly as `train` and `eval` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_cluster.config import Config, ConfigError, build_dataclass

RUN_DIR = "run"


def _derive(config: Config, changes: dict[str, dict[str, Any] | Any]) -> Config:
    raw = config.to_dict()
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    derived = build_dataclass(Config, raw, "")
    derived.check()
    return derived


def _round_data(config: Config, pairs_file: Path) -> dict[str, Any]:
    """The data section of a round's run: the round's pairs, in a format the pipeline detects, and
    no eval split (the rounds are evaluated on held-out prompts instead)."""
    return {
        "train": {"path": str(pairs_file)},
        "eval": None,
        "eval_fraction": 0.0,
        "format": "auto",
        "columns": {},
        "prompt_template": None,
    }


def training_config(config: Config, round_dir: Path, pairs_file: Path, policy: str, base: str) -> Config:
    """Round k's training config: DPO from `policy` on `pairs_file` into round_dir/run.

    The reference is the policy's starting weights (rounds.reference: previous) or the base
    (rounds.reference: base; with LoRA that needs a reference copy, mode model, since switching
    the adapter off gives the starting policy). With LoRA the adapter is merged on save, so
    final/ is a full model the next round starts from and the arena serves.
    """
    reference: dict[str, Any] = {}
    if config.rounds.reference == "base" and policy != base:
        mode = config.reference_mode()
        if mode not in ("model", "precompute"):
            mode = "model"
        reference = {"mode": mode, "name_or_path": base}
    scaling: dict[str, Any] = {}
    if config.scaling.storage_path:
        scaling = {"storage_path": str(Path(config.scaling.storage_path) / round_dir.name)}
    try:
        return _derive(
            config,
            {
                "output_dir": str(round_dir / RUN_DIR),
                "model": {"name_or_path": policy, "revision": None, "gguf_file": None},
                "data": _round_data(config, pairs_file),
                "train": {"eval_strategy": "no", "resume_from": None},
                "lora": {"merge_on_save": True} if config.lora.enabled else {},
                "reference": reference,
                "scaling": scaling,
            },
        )
    except ConfigError as error:
        raise ConfigError(f"{round_dir.name}'s training config: {error}") from error


def evaluation_config(
    config: Config, round_dir: Path, pairs_file: Path, base: str, tuned: str, prompts_file: Path, output: Path
) -> Config:
    """An `eval` of `tuned` against `base` on the held-out prompts, its report at `output`."""
    return _derive(
        config,
        {
            "output_dir": str(round_dir / RUN_DIR),
            "data": _round_data(config, pairs_file),
            "evaluation": {"base": base, "tuned": tuned, "prompts": str(prompts_file), "output": str(output)},
        },
    )
