"""The settings of one `dpo-cluster bench train` run and what a finished stage left, shared by the
orchestrator (`train`), the subprocesses (`train_stages`, `train_data`) and the report
(`train_report`), which import it and not each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("trl", "dpo-cluster", "dpo-cluster-fast")


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; written as JSON for the subprocesses (`train_stages`)."""

    workdir: str
    model: str | None = None  # hub id or directory; None builds the Qwen2 of `model_shape`
    hidden_size: int = 512
    num_layers: int = 8
    steps: int = 20
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    dtype: str = "fp32"  # fp32 | bf16 (mixed precision over fp32 master weights)
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
        return self.model or str(Path(self.workdir) / "model")

    @property
    def data_file(self) -> Path:
        return Path(self.workdir) / "pairs.jsonl"

    @property
    def prepare_dir(self) -> Path:
        return Path(self.workdir) / "prepare"

    def run_dir(self, stage: str) -> Path:
        return Path(self.workdir) / "runs" / stage

    def model_shape(self) -> dict[str, int]:
        """Qwen2-like proportions: 64-dim heads, 4 query heads per kv head, MLP 2.75 x hidden."""
        heads = max(1, self.hidden_size // 64)
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": heads,
            "num_kv_heads": max(1, heads // 4),
            "intermediate_size": max(64, round(2.75 * self.hidden_size / 64) * 64),
        }

    def dpo_cluster_overrides(self, mode: str, output_dir: Path) -> list[str]:
        bf16 = self.dtype == "bf16"
        overrides = [
            f"output_dir={output_dir}",
            f"model.name_or_path={self.model_dir}",
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
