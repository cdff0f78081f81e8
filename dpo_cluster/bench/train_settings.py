"""The settings of one `dpo-cluster bench train` run and what a finished stage left, shared by the
orchestrator (`train`), the subprocesses (`train_stages`, `train_data`) and the report
(`train_report`), which import it and not each other; also how a process's memory is read, which
the orchestrator (from outside) and the stages (their own baseline) both do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The TRL modes first: every other mode's ratios are against them.
TRL_MODES = ("trl", "trl-precompute")
MODES = (*TRL_MODES, "dpo-cluster", "dpo-cluster-fast")
# The modes whose reference log-probs are computed once before training rather than in the loop.
PRECOMPUTE_MODES = ("trl-precompute", "dpo-cluster-fast")

DEFAULT_SHAPE = "default"
DEFAULT_HIDDEN_SIZE = 512
DEFAULT_NUM_LAYERS = 8
# Published configs, built with random weights. Qwen2.5-0.5B: its config.json on the hub
# (494M parameters at 24 layers, 136M of them the tied 151,936 x 896 embedding).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151_936,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32_768,
    },
}


class BenchSettingsError(ValueError):
    """A benchmark setting out of range or in conflict with another, found before anything runs."""


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; written as JSON for the subprocesses (`train_stages`)."""

    workdir: str
    # hub id, directory or "builtin:NAME"; None builds the Qwen2 of `model_shape()`
    model: str | None = None
    shape: str = DEFAULT_SHAPE  # default (Qwen2-like proportions of hidden_size) | a key of SHAPES
    hidden_size: int | None = None  # default shape only; None: DEFAULT_HIDDEN_SIZE
    num_layers: int | None = None  # any built shape; None: the shape's own count
    steps: int = 20
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    dtype: str = "fp32"  # fp32 | bf16 (mixed precision over fp32 master weights, see train_report)
    use_gpu: bool = False
    beta: float = 0.1
    learning_rate: float = 5e-6
    seed: int = 0
    prompt_median: int = 60  # tokens
    chosen_median: int = 50
    rejected_median: int = 40
    length_sigma: float = 0.6  # of the log-normal lengths
    gradient_checkpointing: bool = False
    # dpo-cluster-fast's train.max_tokens_per_micro_batch (each step's pairs cut into forwards of at
    # most this many tokens; the step keeps its pairs). None: 2 x max_length, the smallest budget
    # that holds every pair; 0: no budget (one forward per micro-batch).
    fast_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.shape != DEFAULT_SHAPE and self.shape not in SHAPES:
            raise BenchSettingsError(
                f"shape: {self.shape!r}; choose from {', '.join([DEFAULT_SHAPE, *SHAPES])}"
            )
        if self.model is not None and (self.shape != DEFAULT_SHAPE or self.hidden_size or self.num_layers):
            raise BenchSettingsError(
                "model: a given model has its own shape; drop --shape, --hidden-size and --layers"
            )
        if self.shape != DEFAULT_SHAPE and self.hidden_size is not None:
            raise BenchSettingsError(
                f"hidden_size: fixed by shape {self.shape!r}; only its layer count can change"
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise BenchSettingsError(f"num_layers: at least 1, got {self.num_layers}")

    @property
    def fast_budget(self) -> int | None:
        if self.fast_max_tokens is None:
            return 2 * self.max_length
        return self.fast_max_tokens or None

    @property
    def pairs(self) -> int:
        return self.steps * self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def model_dir(self) -> str:
        """The model's directory (or hub id): the built one, or `model` with a "builtin:NAME"
        resolved (built into the cache on first use, by the setup stage; later calls find it)."""
        if self.model is None:
            return str(Path(self.workdir) / "model")
        from dpo_cluster.modeling import resolve_name_or_path

        return resolve_name_or_path(self.model)

    @property
    def data_file(self) -> Path:
        return Path(self.workdir) / "pairs.jsonl"

    @property
    def prepare_dir(self) -> Path:
        return Path(self.workdir) / "prepare"

    def run_dir(self, stage: str) -> Path:
        return Path(self.workdir) / "runs" / stage

    def model_shape(self) -> dict[str, Any]:
        """The built model's Qwen2 fields. Default shape: Qwen2-like proportions of hidden_size
        (64-dim heads, 4 query heads per kv head, MLP 2.75 x hidden), the tokenizer's vocabulary.
        A named shape: its published config, `num_layers` layers where given."""
        if self.shape != DEFAULT_SHAPE:
            return SHAPES[self.shape] | ({"num_layers": self.num_layers} if self.num_layers else {})
        hidden = self.hidden_size or DEFAULT_HIDDEN_SIZE
        heads = max(1, hidden // 64)
        return {
            "hidden_size": hidden,
            "num_layers": self.num_layers or DEFAULT_NUM_LAYERS,
            "num_heads": heads,
            "num_kv_heads": max(1, heads // 4),
            "intermediate_size": max(64, round(2.75 * hidden / 64) * 64),
        }

    def dpo_cluster_overrides(self, mode: str, output_dir: Path) -> list[str]:
        bf16 = self.dtype == "bf16"
        overrides = [
            f"output_dir={output_dir}",
            f"model.name_or_path={self.model_dir}",
            # DeepSpeed casts the weights to bf16 itself and keeps fp32 masters in its optimizer.
            f"model.dtype={'bfloat16' if bf16 else 'float32'}",
            f"model.gradient_checkpointing={json.dumps(self.gradient_checkpointing)}",
            f"data.train={self.data_file}",
            f"data.max_length={self.max_length}",
            f"deepspeed.precision={self.dtype}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"train.max_steps={self.steps}",
            "train.logging_steps=1",
            f"train.learning_rate={self.learning_rate}",
            f"train.beta={self.beta}",
            f"train.seed={self.seed}",
            "train.eval_strategy=no",
            "train.save_strategy=no",
            "scaling.num_workers=1",
            # One process: nothing to shard, so no ZeRO (its flat fp32 copies and buckets cost memory).
            "deepspeed.zero_stage=0",
            f"scaling.use_gpu={json.dumps(self.use_gpu)}",
        ]
        if mode == "dpo-cluster-fast":
            # One actor with as many threads as a training process has (one GPU on GPU).
            budget = self.fast_budget
            return overrides + [
                "reference.mode=precompute",
                "train.packing=true",
                *([f"train.max_tokens_per_micro_batch={budget}"] if budget else []),
                f"reference.num_cpus={os.cpu_count() or 1}",
                f"reference.num_gpus={1 if self.use_gpu else 0}",
            ]
        return overrides + ["reference.mode=model"]


@dataclass
class StageRun:
    """A finished subprocess: what it wrote, its wall time and its memory seen from outside."""

    result: dict[str, Any] | None
    seconds: float
    peak_tree_mb: float
    peak_process_mb: float
    log: Path
    error: str | None = None

    @property
    def peak_memory_mb(self) -> float:
        return max(self.peak_tree_mb, self.peak_process_mb)


def memory_kb(pid: int | str, *, rss: bool = False) -> int:
    """One process's memory in kB: its PSS (/proc/PID/smaps_rollup: shared pages divided among their
    users), falling back to VmRSS; `rss` reads VmRSS alone. 0 without /proc."""
    sources = [(f"/proc/{pid}/status", "VmRSS:")]
    if not rss:
        sources.insert(0, (f"/proc/{pid}/smaps_rollup", "Pss:"))
    for path, key in sources:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0
