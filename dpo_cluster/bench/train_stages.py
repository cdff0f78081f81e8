"""What each subprocess of `dpo-cluster bench train` runs (`setup`, `precompute`, `trl`,
`trl-precompute`, `dpo-cluster`, `dpo-cluster-fast`), one stage per process so that its memory is
its own. A mode first imports what it trains with and records that process baseline, then
records per optimizer step its end on `time.monotonic()` (one clock for every process on the
machine, read at the same point of the step in every mode), non-pad tokens, entries (pad
included) and loss; the report turns the stamps into step times.

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
    prepare_pairs,
    read_ids,
    read_jsonl,
    write_bench_pairs,
)
from dpo_cluster.bench.train_settings import DEFAULT_SHAPE, BenchSettings, memory_kb


def run_setup(s: BenchSettings) -> dict[str, Any]:
    from dpo_cluster.modeling import load_tokenizer

    if not s.use_gpu:
        _build_deepspeed_cpu_op()
    if s.model is None:
        build_bench_model(s)
    model_dir = s.model_dir  # a builtin is built here, once; later stages find it in the cache
    tokenizer = load_tokenizer(model_dir)
    rows = write_bench_pairs(s, tokenizer)
    train_dir, prepared_with = prepare_pairs(s)
    prompts, chosen, rejected = read_ids(train_dir)
    if len(prompts) != s.pairs:
        raise RuntimeError(f"{len(prompts)} of the {s.pairs} generated pairs were kept by the preparation")
    ours = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    return {
        "train_dir": str(train_dir),
        "model_dir": model_dir,
        "parameters": count_model_parameters(model_dir),
        "model_config": _model_config(model_dir),
        "tokenizer_vocabulary": len(tokenizer),
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


def build_bench_model(s: BenchSettings) -> None:
    """The randomly initialized Qwen2 of `s.model_shape()` with the tiny byte-level tokenizer, in
    `s.model_dir` (float32 safetensors)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from dpo_cluster.tiny import build_tiny_model, build_tiny_tokenizer

    shutil.rmtree(s.model_dir, ignore_errors=True)
    if s.shape == DEFAULT_SHAPE:
        shape = s.model_shape()
        build_tiny_model(s.model_dir, max_position_embeddings=max(1024, s.max_length), seed=s.seed, **shape)
        return
    build_tiny_tokenizer(s.model_dir)
    config = build_shape_config(s, AutoTokenizer.from_pretrained(s.model_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = Qwen2ForCausalLM(config).to(dtype=torch.float32)
    model.save_pretrained(s.model_dir, safe_serialization=True)


def build_shape_config(s: BenchSettings, tokenizer: Any) -> Any:
    """The `Qwen2Config` of a named shape (`SHAPES`), `s.num_layers` layers where given. It keeps
    the published vocabulary (151,936 rows of embedding and output head for Qwen2.5) although the
    tokenizer's ids use only its first thousand or so: the head costs and holds what the real
    model's does; which ids flow through changes neither. bos/eos/pad are the tokenizer's."""
    from dpo_cluster.tiny import build_tiny_qwen2_config

    shape = s.model_shape()
    return build_tiny_qwen2_config(
        tokenizer,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        intermediate_size=shape["intermediate_size"],
        vocab_size=shape["vocab_size"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["rms_norm_eps"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=max(shape["max_position_embeddings"], s.max_length),
    )


def _build_deepspeed_cpu_op() -> None:
    """DeepSpeed compiles its CPU shared-memory comm op the first time it starts on a machine (and
    again for another installation of itself). Compiled here, the compiler's memory and time do not
    land in the first measured dpo-cluster stage."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed imports
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def count_model_parameters(name_or_path: str) -> int:
    """Every parameter once (tied embeddings are one tensor), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    return sum(p.numel() for p in model.parameters())


def _model_config(name_or_path: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    fields = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps")  # fmt: skip
    return {name: getattr(config, name, None) for name in fields}


def _device_name(use_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if use_gpu else f"cpu ({torch.get_num_threads()} threads)"


def _gpu_peak_mb(use_gpu: bool) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / (1 << 20) if use_gpu else None


def measure_baseline(use_gpu: bool) -> dict[str, float | None]:
    """This process's memory after its imports, before any model is loaded, in MB: host (the larger
    of PSS and RSS, as the peak is the larger of the tree's PSS and the peak RSS) and GPU allocated
    (None on CPU)."""
    host_kb = max(memory_kb("self"), memory_kb("self", rss=True))
    gpu_mb = None
    if use_gpu:
        import torch

        gpu_mb = torch.cuda.memory_allocated() / (1 << 20)
    return {"host_mb": host_kb / 1024, "gpu_mb": gpu_mb}


def _host_high_water_mb() -> float | None:
    """This process's peak RSS so far (VmHWM), None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


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
        started = time.monotonic()
        reference = compute_reference_logps(config, prepared)
        seconds = time.monotonic() - started
    finally:
        ray.shutdown()
    actors = reference.report["actors"]
    return {
        "seconds": seconds,
        "train_dir": str(prepared.split_dir("train")),
        "reference_dir": str(reference.directory),
        "report": reference.report,
        "how": f"Ray Data actor pool of {actors['concurrency']} actor(s), {actors['num_cpus']:g} CPUs and "
        f"{actors['num_gpus']:g} GPUs each, {actors['batch_size']} pairs per forward, reference in "
        f"{config.reference.resolved_dtype(config.compute_dtype())}",
    }


# ----------------------------------------------------------------------------------------------
# TRL


def run_trl(s: BenchSettings, mode: str) -> dict[str, Any]:
    """TRL's DPOTrainer. `trl`: its reference model in the loop; `trl-precompute`:
    `precompute_ref_log_probs=True`, which scores every pair with the policy (before its first
    step, so the policy is the reference) inside `DPOTrainer.__init__` and then keeps no
    reference model (`trainer.ref_model is None`, checked)."""
    import datasets
    import torch
    import trl  # noqa: F401  (imported before the baseline: the stage's own libraries)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    started, baseline = time.monotonic(), measure_baseline(s.use_gpu)
    precompute: dict[str, Any] = {}
    trainer_class = _timed_precompute_trainer(DPOTrainer, precompute, s.use_gpu)
    ref_model = None
    if mode == "trl" and s.dtype == "bf16":
        # TRL would copy the policy's fp32 weights; a bf16 reference holds what dpo-cluster's does
        # (2 bytes per parameter) and computes the same under autocast (its matmuls are bf16 anyway).
        ref_model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.bfloat16)
    args = _build_trl_args(s, mode)
    clock = _build_step_clock(s.use_gpu)
    trainer = trainer_class(
        model=s.model_dir,
        ref_model=ref_model,
        args=args,
        train_dataset=datasets.Dataset.from_list(read_jsonl(s.data_file)),
        processing_class=AutoTokenizer.from_pretrained(s.model_dir),
        callbacks=[clock],
    )
    if mode == "trl-precompute":
        if "seconds" not in precompute:
            raise RuntimeError(
                "TRL did not call DPOTrainer._precompute_ref_logps: its precompute is not timed"
            )
        if trainer.ref_model is not None:
            raise RuntimeError("TRL kept a reference model in memory with precompute_ref_log_probs=True")
    recorder = BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result = {
        "steps": _trl_step_records(s, losses, recorder.batches, clock.stamps),
        "started": started,
        "finished": time.monotonic(),
        "baseline": baseline,
        "device": _device_name(s.use_gpu),
        "gpu_max_allocated_mb": _gpu_peak_mb(s.use_gpu),
        "dtypes": _trl_dtypes(trainer),
        "notes": [
            f"optimizer {getattr(args.optim, 'value', args.optim)}",
            f"attention {trainer.model.config._attn_implementation}",
            f"bf16 autocast {args.bf16}",
            "reference: none in memory (precomputed)" if trainer.ref_model is None else "reference: a model",
        ],
    }
    if precompute:
        result["precompute"] = precompute | {
            "how": f"DPOTrainer.__init__ (precompute_ref_log_probs), the policy as reference, "
            f"{args.precompute_ref_batch_size or args.per_device_train_batch_size} pairs per forward"
        }
    return result


def _timed_precompute_trainer(base: type, record: dict[str, Any], use_gpu: bool) -> type:
    """`base` (DPOTrainer) with its reference precompute timed: TRL 1.16 scores a split in
    `_precompute_ref_logps`, called from `__init__`. Into `record` go its seconds, the host's peak
    RSS when it ends and, on GPU, its peak allocation (the peak is then reset, so the mode's own
    peak is that of training)."""
    import torch

    class TimedPrecomputeDPOTrainer(base):  # type: ignore[misc, valid-type]
        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            dataset = super()._precompute_ref_logps(*args, **kwargs)
            if use_gpu:
                torch.cuda.synchronize()
            record["seconds"] = record.get("seconds", 0.0) + time.monotonic() - started
            record["rows_scored"] = record.get("rows_scored", 0) + len(dataset)
            record["host_peak_mb"] = _host_high_water_mb()
            if use_gpu:
                record["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / (1 << 20)
                torch.cuda.reset_peak_memory_stats()
            return dataset

    return TimedPrecomputeDPOTrainer


def _trl_dtypes(trainer: Any) -> dict[str, str | None]:
    """The dtypes TRL trained with, to check against the report's model-state layout: the policy's
    weights, the reference's (None without one) and AdamW's moments."""
    state = getattr(trainer.optimizer, "state", {})
    moments = next((v["exp_avg"] for v in state.values() if "exp_avg" in v), None)
    name = lambda t: None if t is None else str(t.dtype).removeprefix("torch.")  # noqa: E731
    return {
        "weights": name(next(trainer.model.parameters())),
        "reference": name(next(trainer.ref_model.parameters())) if trainer.ref_model is not None else None,
        "moments": name(moments),
    }


def _build_trl_args(s: BenchSettings, mode: str) -> Any:
    """TRL's `DPOConfig` with the benchmark's hyperparameters; no saving, evaluation or reporting."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(s.run_dir(mode)),
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        max_steps=s.steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type="linear",
        beta=s.beta,
        max_length=s.max_length,
        seed=s.seed,
        # fp32 weights (the master copy) under bf16 autocast; said explicitly, since transformers 5
        # would otherwise load a bf16 checkpoint in bf16 and train without fp32 masters.
        model_init_kwargs={"dtype": "float32"},
        bf16=s.dtype == "bf16",
        use_cpu=not s.use_gpu,
        precompute_ref_log_probs=mode == "trl-precompute",
        # TRL turns it on by default; both sides run with the same setting.
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def _build_step_clock(use_gpu: bool) -> Any:
    """A trainer callback whose `stamps` are `time.monotonic()` at the end of every optimizer step:
    `on_step_end`, which the Trainer calls after optimizer.step(), the LR schedule's step and
    zero_grad, before it logs the step; on GPU after the queued work is done."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if use_gpu:
                torch.cuda.synchronize()
            self.stamps.append(time.monotonic())

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
    """Per optimizer step: its end stamp, the tokens and entries of its accumulated batches, its
    loss. Raises RuntimeError when TRL did not run exactly the asked steps and batches."""
    accum = s.gradient_accumulation_steps
    if len(losses) != s.steps or len(batches) != s.steps * accum or len(stamps) != s.steps:
        raise RuntimeError(
            f"expected {s.steps} steps of {accum} batches; TRL logged {len(losses)} losses, collated "
            f"{len(batches)} batches and ended {len(stamps)} steps"
        )
    steps = []
    for k in range(s.steps):
        step_batches = batches[k * accum : (k + 1) * accum]
        steps.append(
            {
                "end": stamps[k],
                "tokens": sum(b[0] for b in step_batches),
                "entries": sum(b[1] for b in step_batches),
                "loss": losses[k],
            }
        )
    return steps


# ----------------------------------------------------------------------------------------------
# dpo-cluster


def run_dpo_cluster(s: BenchSettings, mode: str) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if s.use_gpu else "cpu")  # read when deepspeed imports
    import deepspeed  # noqa: F401  (imported before the baseline: the stage's own libraries)
    import transformers  # noqa: F401

    from dpo_cluster.config import load_config
    from dpo_cluster.train.local import run_local
    from dpo_cluster.train.metrics_log import MONOTONIC_KEY

    started, baseline = time.monotonic(), measure_baseline(s.use_gpu)
    source = "precompute" if mode == "dpo-cluster-fast" else "setup"
    stage = json.loads((Path(s.workdir) / "results" / f"{source}.json").read_text())
    reference_dir = Path(stage["reference_dir"]) if "reference_dir" in stage else None
    output_dir = s.run_dir(mode)
    shutil.rmtree(output_dir, ignore_errors=True)
    config = load_config(None, s.dpo_cluster_overrides(mode, output_dir))
    summary, _ = run_local(config, Path(stage["train_dir"]), reference_dir=reference_dir)
    rows = [row for row in read_jsonl(output_dir / "metrics.jsonl") if "loss" in row]
    steps = []
    for row in rows:
        # One row per step (logging_steps=1, no evaluation): tokens_per_second and padding_fraction
        # are the step's. The row's stamp is taken where TRL's is (`MetricsLog.log`).
        tokens = round(row["tokens_per_second"] * row["seconds_per_step"])
        entries = round(tokens / (1.0 - row["padding_fraction"]))
        steps.append({"end": row[MONOTONIC_KEY], "tokens": tokens, "entries": entries, "loss": row["loss"]})
    return {
        "steps": steps,
        "started": started,
        "finished": time.monotonic(),
        "baseline": baseline,
        "device": _device_name(s.use_gpu),
        "gpu_max_allocated_mb": _gpu_peak_mb(s.use_gpu),
        "notes": [
            "optimizer torch AdamW via DeepSpeed",
            f"deepspeed zero stage {config.deepspeed.zero_stage}, precision {summary.get('precision')}",
            f"train.packing {config.train.packing}",
            f"train.max_tokens_per_micro_batch {config.train.max_tokens_per_micro_batch}",
            f"train.logps_chunk_size {getattr(config.train, 'logps_chunk_size', None)}",
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
    elif stage in ("trl", "trl-precompute"):
        result = run_trl(s, stage)
    elif stage in ("dpo-cluster", "dpo-cluster-fast"):
        result = run_dpo_cluster(s, stage)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
