"""The one configuration tree of dpo-cluster: the root `Config`, its cross-section rules, loading.

A config is a YAML file loaded strictly into the section dataclasses (one module per group of
sections), then patched by dotted `key=value` overrides from the command line
(`data.max_length=512`, `train.loss_type=[sigmoid,sft]`). Rules that span sections run here, at
load time, so a bad config fails before any Ray worker starts; importing it needs no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_cluster.config import loader
from dpo_cluster.config.evaluation import JUDGE_RULES, EvalConfig
from dpo_cluster.config.loader import ConfigError, build_dataclass, valid_keys
from dpo_cluster.config.model_data import DataConfig, ModelConfig, SourceConfig
from dpo_cluster.config.reference import LoraConfig, ReferenceConfig
from dpo_cluster.config.rounds import RoundsConfig
from dpo_cluster.config.serve import ServeConfig
from dpo_cluster.config.tracking import MlflowConfig, TrackingConfig, WandbConfig
from dpo_cluster.config.train import (
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    DeepSpeedConfig,
    ScalingConfig,
    TrainConfig,
)

__all__ = [
    "F_DIVERGENCE_TYPES",
    "JUDGE_RULES",
    "LOSS_TYPES",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "LoraConfig",
    "MlflowConfig",
    "ModelConfig",
    "ReferenceConfig",
    "RoundsConfig",
    "ScalingConfig",
    "ServeConfig",
    "SourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "apply_override",
    "build_dataclass",
    "load_config",
    "valid_keys",
]


@dataclass
class Config:
    # Directory for everything a run writes: data_report.json, prepared/, metrics, final/.
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    # Experiment tracking (MLflow, Weights & Biases): off by default.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)

    def check(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required (the directory this run writes to)")
        self.model.check()
        self.data.check(require_train=self.rounds.prompts is None)
        self.scaling.check()
        self.train.check(self.scaling.num_workers)
        self.serve.check()
        self.evaluation.check()
        self.tracking.check()
        self.rounds.check()
        self._check_cross_sections()

    def check_serving(self) -> None:
        """The checks that matter to `dpo-cluster serve`: a base and a tuned model must be named
        (directly, or through model.name_or_path and output_dir), and the serve section valid.
        Training-only sections keep their defaults' validity, so they are not re-checked."""
        if not (self.serve.base or self.model.name_or_path):
            raise ConfigError("serve.base: required (or model.name_or_path): the base model to serve")
        if not (self.serve.tuned or self.output_dir):
            raise ConfigError("serve.tuned: required (or output_dir, whose final/ is the tuned model)")
        self.serve.check()

    def serve_base(self) -> str:
        return self.serve.base or self.model.name_or_path

    def serve_tuned(self) -> str:
        return self.serve.tuned or str(Path(self.output_dir) / "final")

    def arena_db(self) -> str:
        if self.serve.arena_db:
            return self.serve.arena_db
        return str(Path(self.output_dir or ".") / "arena" / "votes.sqlite")

    def _check_cross_sections(self) -> None:
        self._check_lora()
        budget = self.train.max_tokens_per_micro_batch
        if budget is not None and budget < 2 * self.data.max_length:
            raise ConfigError(
                f"train.max_tokens_per_micro_batch: {budget} cannot hold one pair of data.max_length="
                f"{self.data.max_length} tokens (chosen and rejected); set it to at least {2 * self.data.max_length}"
            )
        reference_budget = self.reference.max_tokens_per_forward
        if reference_budget is not None and reference_budget < 2 * self.data.max_length:
            raise ConfigError(
                f"reference.max_tokens_per_forward: {reference_budget} cannot hold one pair of "
                f"data.max_length={self.data.max_length} tokens; set it to at least {2 * self.data.max_length}"
            )
        self._check_reference()
        if self.deepspeed.offload_params != "none" and self.deepspeed.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params: parameter offload needs deepspeed.zero_stage: 3")
        if self.deepspeed.offload_optimizer != "none" and self.deepspeed.zero_stage == 0:
            raise ConfigError(
                "deepspeed.offload_optimizer: optimizer offload needs deepspeed.zero_stage >= 1"
            )
        if not self.scaling.use_gpu and self.deepspeed.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 needs GPUs; use fp32 or bf16 on CPU")

    def _check_lora(self) -> None:
        if not self.lora.enabled:
            changed = _changed_fields(self.lora, LoraConfig(), keep=("enabled",))
            if changed:
                raise ConfigError(
                    f"lora.{changed[0]}: set, but lora.enabled is false (enable LoRA or remove it)"
                )
        if self.lora.load_in_4bit and not self.scaling.use_gpu:
            raise ConfigError(
                "lora.load_in_4bit: QLoRA needs CUDA GPUs (scaling.use_gpu: true); on CPU use plain LoRA"
            )

    def reference_mode(self) -> str:
        """reference.mode with `auto` resolved: none for a reference-free train.loss_type, else
        adapter_disabled with LoRA and model without."""
        return self.reference.resolved_mode(self.lora.enabled, self.train.reference_free())

    def _check_reference(self) -> None:
        mode = self.reference_mode()
        if (mode == "none") != self.train.reference_free():
            free = self.train.reference_free()
            needs = "needs no reference" if free else "needs a reference"
            fix = "reference.mode: none (or auto)" if free else "another reference.mode"
            raise ConfigError(
                f"reference.mode: {self.reference.mode} (resolved: {mode}) does not fit train.loss_type "
                f"{', '.join(self.train.loss_type)}, which {needs}; set {fix}"
            )
        if mode == "adapter_disabled" and not self.lora.enabled:
            raise ConfigError("reference.mode: adapter_disabled needs lora.enabled: true")
        if self.train.sync_ref_model:
            self._check_sync_ref_model(mode)
        if self.train.unpaired() and mode in ("precompute", "precomputed"):
            raise ConfigError(
                f"reference.mode: {mode} cannot serve train.loss_type kto: its KL estimate scores each "
                "prompt with another example's completion of the same micro-batch, pairs no stored "
                "log-prob covers; use reference.mode model or adapter_disabled"
            )
        if self.reference.name_or_path is not None and mode not in ("model", "precompute"):
            raise ConfigError(
                f"reference.name_or_path: only used with reference.mode: model or precompute (mode is {mode})"
            )
        self.reference.check()
        if mode != "precompute":
            changed = _changed_fields(self.reference, ReferenceConfig(), keep=("mode", "name_or_path"))
            if changed:
                raise ConfigError(
                    f"reference.{changed[0]}: only used with reference.mode: precompute (mode is {mode})"
                )
        elif self.lora.load_in_4bit and self.reference.num_gpus == 0:
            # The LoRA policy's reference is its 4-bit base; the actors load that same quantized
            # base, which bitsandbytes can only do on a CUDA GPU.
            raise ConfigError(
                "reference.num_gpus: precompute with lora.load_in_4bit loads the 4-bit base on the "
                "actors' GPUs; set reference.num_gpus > 0"
            )

    def _check_sync_ref_model(self, mode: str) -> None:
        why = {
            "precompute": "its reference log-probs are scored once from the starting weights, so a "
            "reference that moves during training would make them stale",
            "precomputed": "the data's reference log-probs come from a fixed reference, so a reference "
            "that moves during training would make them stale",
            "adapter_disabled": "with LoRA the reference is the policy with its adapter off, not a "
            "model of its own to update (set reference.mode: model to hold a frozen copy)",
            "none": "the loss has no reference",
        }.get(mode)
        if why is not None:
            raise ConfigError(f"train.sync_ref_model: cannot be used with reference.mode {mode}: {why}")
        if self.lora.enabled:
            raise ConfigError(
                "train.sync_ref_model: not supported with lora.enabled (the policy's weights are the "
                "frozen base plus an adapter, not a model the reference can be mixed with)"
            )

    def tokenizer_path(self) -> str:
        return self.data.tokenizer or self.model.name_or_path

    def compute_dtype(self) -> str:
        """The torch dtype name the policy's forward runs in: deepspeed.precision's (bf16, fp16;
        DeepSpeed casts the engine's module), or with fp32 the weights' own (`weights_dtype`)."""
        precision = self.deepspeed.resolved_precision(self.scaling.use_gpu)
        return _PRECISION_DTYPES.get(precision) or self.weights_dtype()

    def weights_dtype(self) -> str:
        """The torch dtype name the policy loads in: model.dtype, with auto the precision's."""
        if self.model.dtype != "auto":
            return self.model.dtype
        precision = self.deepspeed.resolved_precision(self.scaling.use_gpu)
        return _PRECISION_DTYPES.get(precision, "float32")

    def policy_model(self) -> ModelConfig:
        """The policy's loading settings: model.*, with the dtype resolved."""
        return dataclasses.replace(self.model, dtype=self.weights_dtype())

    def reference_model(self) -> ModelConfig:
        """The frozen reference's loading settings (in-loop copy and precompute actors alike):
        reference.name_or_path or the policy's starting weights, in `reference.resolved_dtype`,
        so its log-probs are the ones a reference computing like the policy gives."""
        reference = self.reference
        return dataclasses.replace(
            self.model,
            name_or_path=reference.name_or_path or self.model.name_or_path,
            revision=None if reference.name_or_path else self.model.revision,
            dtype=reference.resolved_dtype(self.compute_dtype()),
            gradient_checkpointing=False,
        )

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute. Ray Train runs each worker in a working directory
        of its own, so a relative output_dir or model path would resolve somewhere else there.
        Hub ids and URIs (s3://...) are left as they are."""

        def existing(value: str | None) -> str | None:
            if value is None or "://" in value or not Path(value).expanduser().exists():
                return value
            return str(Path(value).expanduser().resolve())

        def always(value: str | None) -> str | None:
            if value is None or "://" in value:
                return value
            return str(Path(value).expanduser().resolve())

        return dataclasses.replace(
            self,
            output_dir=always(self.output_dir) or "",
            model=dataclasses.replace(self.model, name_or_path=existing(self.model.name_or_path) or ""),
            data=dataclasses.replace(self.data, tokenizer=existing(self.data.tokenizer)),
            reference=dataclasses.replace(self.reference, name_or_path=existing(self.reference.name_or_path)),
            train=dataclasses.replace(self.train, resume_from=existing(self.train.resume_from)),
            scaling=dataclasses.replace(self.scaling, storage_path=always(self.scaling.storage_path)),
            tracking=self.tracking.with_absolute_paths(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The compute dtype of each mixed precision; fp32 computes in the weights' own dtype.
_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _changed_fields(section: Any, defaults: Any, keep: tuple[str, ...]) -> list[str]:
    """Names of `section`'s fields, other than `keep`, set to something other than their default."""
    return [
        f.name
        for f in dataclasses.fields(section)
        if f.name not in keep and getattr(section, f.name) != getattr(defaults, f.name)
    ]


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, serving: bool = False
) -> Config:
    """Load a YAML config (or start from defaults), apply `key=value` overrides, type-check and
    validate (`Config.check`, or `Config.check_serving` when serving). Raises ConfigError naming
    the offending key."""
    raw: dict[str, Any] = loader.read_yaml(path) if path is not None else {}
    for item in overrides or []:
        apply_override(raw, item)
    config = build_dataclass(Config, raw, "")
    if serving:
        config.check_serving()
    else:
        config.check()
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested config dict; the value is parsed as YAML (numbers, null,
    [lists]), falling back to the literal string. A source's string shorthand gains siblings."""
    loader.apply_override(raw, item, Config)
