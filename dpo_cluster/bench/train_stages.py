"""What each subprocess of `dpo-cluster bench train` runs (`setup`, `precompute`, `trl`,
`dpo-cluster`, `dpo-cluster-fast`), one stage per process so that its memory is its own. A mode
records per optimizer step its wall seconds, non-pad tokens, entries (pad included) and loss.

    python -m dpo_cluster.bench.train_stages STAGE SETTINGS_JSON RESULT_JSON
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dpo_cluster.bench.train_data import (
    count_trl_tokens,
    generate_length_pairs,
    prepare_pairs,
    read_ids,
    read_jsonl,
)
from dpo_cluster.bench.train_settings import BenchSettings


def run_setup(s: BenchSettings) -> dict[str, Any]:
    from dpo_cluster.data.samples import write_jsonl
    from dpo_cluster.modeling import load_tokenizer

    if not s.use_gpu:
        _build_deepspeed_cpu_op()
    if s.model is None:
        from dpo_cluster.tiny import build_tiny_model

        shutil.rmtree(s.model_dir, ignore_errors=True)
        shape = s.model_shape()
        build_tiny_model(s.model_dir, max_position_embeddings=max(1024, s.max_length), seed=s.seed, **shape)
    tokenizer = load_tokenizer(s.model_dir)
    rows = generate_length_pairs(
        s.pairs,
        tokenizer,
        seed=s.seed,
        prompt_median=s.prompt_median,
        chosen_median=s.chosen_median,
        rejected_median=s.rejected_median,
        sigma=s.length_sigma,
        max_length=s.max_length,
    )
    write_jsonl(rows, s.data_file)
    train_dir, prepared_with = prepare_pairs(s)
    prompts, chosen, rejected = read_ids(train_dir)
    if len(prompts) != s.pairs:
        raise RuntimeError(f"{len(prompts)} of the {s.pairs} generated pairs were kept by the preparation")
    ours = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    return {
        "train_dir": str(train_dir),
        "parameters": _count_parameters(s.model_dir),
        "device": _device_name(s.use_gpu),
        "tokens": {"dpo_cluster": ours, "trl": count_trl_tokens(rows, tokenizer, s.max_length)},
        "data": {
            "prepared_with": prepared_with,
            "prompt_tokens_median": statistics.median(map(len, prompts)),
            "chosen_tokens_median": statistics.median(map(len, chosen)),
            "rejected_tokens_median": statistics.median(map(len, rejected)),
            "sequence_tokens_max": max(
                len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)
            ),
        },
    }


def _build_deepspeed_cpu_op() -> None:
    """DeepSpeed compiles its CPU shared-memory comm op the first time it starts on a machine (and
    again for another installation of itself). Compiled here, the compiler's memory and time do not
    land in the first measured dpo-cluster stage."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed imports
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _count_parameters(name_or_path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    return sum(p.numel() for p in model.parameters())


def _device_name(use_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if use_gpu else f"cpu ({torch.get_num_threads()} threads)"


def _gpu_peak_mb(use_gpu: bool) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / (1 << 20) if use_gpu else None


def run_precompute(s: BenchSettings) -> dict[str, Any]:
    import ray

    from dpo_cluster.config import load_config
    from dpo_cluster.data.pipeline import REPORT_FILE, PreparedData
    from dpo_cluster.reference.cache import REFERENCE_DIR
    from dpo_cluster.reference.precompute import compute_reference_logps

    config = load_config(None, s.dpo_cluster_overrides("dpo-cluster-fast", s.prepare_dir))
    prepared = PreparedData(
        s.prepare_dir, json.loads((s.prepare_dir / REPORT_FILE).read_text()), cache_hit=True
    )
    # Score every pair, the one-off cost, rather than reuse a cache of an earlier run in this workdir.
    shutil.rmtree(s.prepare_dir / REFERENCE_DIR, ignore_errors=True)
    # One logical CPU more than the machine has: the actor gets as many CPUs (threads) as a training
    # process uses, and Ray Data's read and write tasks still find one to run on.
    ray.init(
        address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False
    )
    try:
        started = time.perf_counter()
        reference = compute_reference_logps(config, prepared)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"seconds": seconds, "train_dir": str(reference.split_dir("train")), "report": reference.report}


def run_trl(s: BenchSettings) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    started = time.perf_counter()
    args = _build_trl_args(s)
    clock = _build_step_clock(s.use_gpu)
    trainer = DPOTrainer(
        model=s.model_dir,
        args=args,
        train_dataset=datasets.Dataset.from_list(read_jsonl(s.data_file)),
        processing_class=AutoTokenizer.from_pretrained(s.model_dir),
        callbacks=[clock],
    )
    recorder = BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "steps": _trl_step_records(s, losses, recorder.batches, clock.stamps),
        "device": _device_name(s.use_gpu),
        "gpu_max_allocated_mb": _gpu_peak_mb(s.use_gpu),
        "outside_steps_seconds": time.perf_counter() - started - (clock.stamps[-1] - clock.stamps[0]),
        "notes": [
            f"optimizer {getattr(args.optim, 'value', args.optim)}",
            f"attention {trainer.model.config._attn_implementation}",
        ],
    }


def _build_trl_args(s: BenchSettings) -> Any:
    """TRL's `DPOConfig` with the benchmark's hyperparameters; no saving, evaluation or reporting."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(s.run_dir("trl")),
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        max_steps=s.steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type="linear",
        beta=s.beta,
        max_length=s.max_length,
        seed=s.seed,
        bf16=s.dtype == "bf16",
        use_cpu=not s.use_gpu,
        # TRL turns it on by default; both sides run with the same setting.
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def _build_step_clock(use_gpu: bool) -> Any:
    """A trainer callback whose `stamps` are the wall clock at training start, then at the end of
    every optimizer step (after the GPU's queued work, on GPU)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if use_gpu:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    return StepClock()


class BatchRecorder:
    """Wraps a trainer's collator: (non-pad tokens, entries) of every padded batch it collates."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        self.batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch


def _trl_step_records(
    s: BenchSettings, losses: list[float], batches: list[tuple[int, int]], stamps: list[float]
) -> list[dict[str, Any]]:
    """Per optimizer step: seconds, tokens and entries of its accumulated batches, and its loss.
    Raises RuntimeError when TRL did not run exactly the asked steps and batches."""
    accum = s.gradient_accumulation_steps
    if len(losses) != s.steps or len(batches) != s.steps * accum or len(stamps) != s.steps + 1:
        raise RuntimeError(
            f"expected {s.steps} steps of {accum} batches; TRL logged {len(losses)} losses, collated "
            f"{len(batches)} batches and ended {len(stamps) - 1} steps"
        )
    steps = []
    for k in range(s.steps):
        step_batches = batches[k * accum : (k + 1) * accum]
        steps.append(
            {
                "seconds": stamps[k + 1] - stamps[k],
                "tokens": sum(b[0] for b in step_batches),
                "entries": sum(b[1] for b in step_batches),
                "loss": losses[k],
            }
        )
    return steps


def run_dpo_cluster(s: BenchSettings, mode: str) -> dict[str, Any]:
    from dpo_cluster.config import load_config
    from dpo_cluster.train.local import run_local

    started = time.perf_counter()
    source = "precompute" if mode == "dpo-cluster-fast" else "setup"
    train_dir = Path(json.loads((Path(s.workdir) / "results" / f"{source}.json").read_text())["train_dir"])
    output_dir = s.run_dir(mode)
    shutil.rmtree(output_dir, ignore_errors=True)
    config = load_config(None, s.dpo_cluster_overrides(mode, output_dir))
    run_local(config, train_dir)
    rows = [row for row in read_jsonl(output_dir / "metrics.jsonl") if "loss" in row]
    steps = []
    for row in rows:
        # One row per step (logging_steps=1): tokens_per_second and padding_fraction are the step's.
        tokens = round(row["tokens_per_second"] * row["seconds_per_step"])
        entries = round(tokens / (1.0 - row["padding_fraction"]))
        steps.append(
            {"seconds": row["seconds_per_step"], "tokens": tokens, "entries": entries, "loss": row["loss"]}
        )
    return {
        "steps": steps,
        "device": _device_name(s.use_gpu),
        "gpu_max_allocated_mb": _gpu_peak_mb(s.use_gpu),
        "outside_steps_seconds": time.perf_counter() - started - sum(step["seconds"] for step in steps),
        "notes": [
            "optimizer torch AdamW via DeepSpeed",
            f"deepspeed zero stage {config.deepspeed.zero_stage}",
            f"train.packing {config.train.packing}",
            f"train.max_tokens_per_micro_batch {config.train.max_tokens_per_micro_batch}",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    stage, settings_path, result_path = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    s = BenchSettings(**json.loads(Path(settings_path).read_text()))
    if stage == "setup":
        result = run_setup(s)
    elif stage == "precompute":
        result = run_precompute(s)
    elif stage == "trl":
        result = run_trl(s)
    elif stage in ("dpo-cluster", "dpo-cluster-fast"):
        result = run_dpo_cluster(s, stage)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
