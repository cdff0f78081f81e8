"""`dpo-cluster bench gpu`: one command that checks training numerics and measures throughput on one
GPU, without Ray or a cluster (a lent GPU machine has torch and transformers but no Ray). It builds
the 0.5B-class bench model with random weights, prepares generated pairs in this process, runs the
real per-worker loop (`run_local`), the precompute actors' scorer and `sequence_logps`, and prints
one table of PASS/FAIL checks and figures; the exit status is 1 when any check fails.

    python -m dpo_cluster.bench.gpu_check [--device cuda] [--output gpu_check.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.bench.train_report import PEAK_BF16_TFLOPS
from dpo_cluster.bench.train_settings import SHAPES, BenchSettings, BenchSettingsError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from dpo_cluster.config import Config
    from dpo_cluster.reference.scorer import ReferenceSpec

LN2 = math.log(2)
# In-loop, policy and reference are the same weights computed by the same kernels on the same
# micro-batch: their log-probs are bit-identical, so the first loss is ln 2 to float rounding.
LN2_TOLERANCE = 1e-6
# Two bf16 computations of the same sequence that differ only in their kernels (another batch
# shape, packed vs padded attention, full logits vs a chunked head) may round any activation one
# unit in the last place apart (2^-8 relative). Allowed per token: 4 such units of its O(1) logits
# (2^-6 nats on this random-weight model); n completion tokens' errors add like a random walk.
# At 450 tokens that is 0.33 nats, under 3% of one token's log-prob (ln 151,936 = 11.9), so a
# token scored too many or too few, a scored prompt or pad, or another model fails by far.
BF16_TOKEN_NATS = 2.0**-6
# The head weight's (V, H) gradient in bf16: the full-logits path rounds it once, the fused head
# once per chunk of rows it adds in (`fused_head`), so the two drift apart like a random walk over
# chunks. Allowed: 4 bf16 units of relative Frobenius distance x sqrt(chunks).
BF16_GRAD_RTOL = 2.0**-6
SHAPE = "qwen2.5-0.5b"
MB = 1 << 20

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the table: a check (passed True/False) or a figure (passed None)."""

    name: str
    passed: bool | None
    value: str
    limit: str = ""
    note: str = ""
    measured: float | None = None  # a check's figure as a number, for the JSON


@dataclass
class Report:
    """What the check found: the table's rows, and the figures as numbers for the JSON."""

    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(row.passed is not False for row in self.rows)

    def check(self, name: str, passed: bool, measured: float, value: str, limit: str, note: str = "") -> None:
        self.rows.append(Row(name, passed, value, limit, note, measured))

    def figure(self, name: str, key: str, value: Any, shown: str, note: str = "") -> None:
        self.figures[key] = value
        self.rows.append(Row(name, None, shown, "", note))

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """A check that raises is a FAIL row with the error; the next checks still run."""
        try:
            yield
        except Exception as error:  # any failure of the code under check is that check's result
            logger.exception("%s failed", name)
            self.rows.append(Row(name, False, f"{type(error).__name__}: {str(error)[:160]}", "runs"))


@dataclass(frozen=True)
class Plan:
    """The run's fixed choices besides `BenchSettings`: kernel, ZeRO stage, the user's overrides."""

    device: str  # cuda | cpu
    attention: str  # attn_implementation of every model
    packing: bool  # train.packing: on with flash-attn, so its varlen path runs
    zero_stage: int
    overrides: tuple[str, ...]  # dotted config overrides from the command line, applied to every run
    peak_tflops: float | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m dpo_cluster.bench.gpu_check` and `dpo-cluster bench gpu`."""
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default cuda")
    parser.add_argument("--shape", choices=["default", *SHAPES], default=SHAPE, help=f"default {SHAPE}")
    parser.add_argument("--hidden-size", type=int, default=None, help="default shape only")
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's own count")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward (default 8)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument(
        "--zero-stage", type=int, choices=[0, 2], default=0, help="DeepSpeed ZeRO (default 0)"
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "sdpa", "eager", "flash_attention_2"],
        help="auto: flash_attention_2 (with packing) where flash_attn imports on cuda, else sdpa",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by name)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep model, data and runs here (default: temp dir)")
    parser.add_argument(
        "--output", default=None, help="write the figures as JSON here, the table beside (.md)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every run, e.g. train.beta=0.2",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_cluster.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_check(parser.parse_args(argv))


def run_check(args: argparse.Namespace) -> int:
    """Run every check of `args` (see `add_arguments`), print the table -> exit status (0: all PASS,
    1: a check failed, 2: unusable flags)."""
    try:
        plan = build_plan(args)
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-gpu-check-"))
        s = build_settings(args, str(workdir), plan)
    except (BenchSettingsError, ValueError) as error:
        print(f"gpu check: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("DS_ACCELERATOR", plan.device)  # read when deepspeed imports
    from dpo_cluster.config import ConfigError

    started = time.monotonic()
    try:
        report = run_checks(s, plan)
    except ConfigError as error:  # an override the config rejects, found before any check runs
        print(f"gpu check: error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report.figures["seconds"] = time.monotonic() - started
    table = format_table(report, s, plan)
    print("\n" + table, flush=True)
    if args.output:
        write_outputs(Path(args.output), report, s, plan, table)
    return 0 if report.passed else 1


def build_plan(args: argparse.Namespace) -> Plan:
    """The kernel and stage choices of `args`; ValueError for a device this machine lacks."""
    import torch

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError(
            "run the check as one process (python -m dpo_cluster.bench.gpu_check), not under torchrun"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu")
    attention = args.attention
    if attention == "auto":
        flash = args.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attention = "flash_attention_2" if flash else "sdpa"
    return Plan(
        device=args.device,
        attention=attention,
        packing=attention == "flash_attention_2",
        zero_stage=args.zero_stage,
        overrides=tuple(args.overrides),
        peak_tflops=args.peak_tflops,
    )


def build_settings(args: argparse.Namespace, workdir: str, plan: Plan) -> BenchSettings:
    """The bench settings of the check: bf16, the lengths a fraction of max_length (sequences of
    ~3/4 of it, the longest cut at it)."""
    n = args.max_length
    if min(args.steps, args.micro_batch_size) < 1 or n < 16:
        raise ValueError("--steps and --micro-batch-size: at least 1; --max-length: at least 16")
    return BenchSettings(
        workdir=workdir,
        shape=args.shape,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        max_length=n,
        dtype="bf16",
        use_gpu=plan.device == "cuda",
        seed=args.seed,
        prompt_median=max(2, n // 4),
        chosen_median=max(2, n // 2),
        rejected_median=max(2, 3 * n // 8),
    )


def run_config(s: BenchSettings, plan: Plan, output_dir: Path, *keys: str) -> Config:
    """The bench's dpo-cluster config (in-loop reference, bf16, one worker) with the plan's kernel
    and stage, then the user's overrides, then `keys` (what the run itself must be)."""
    from dpo_cluster.config import load_config

    chosen = [
        f"model.attn_implementation={plan.attention}",
        f"train.packing={json.dumps(plan.packing)}",
        f"deepspeed.zero_stage={plan.zero_stage}",
        "train.shuffle=false",
    ]
    return load_config(
        None, [*s.dpo_cluster_overrides("dpo-cluster", output_dir), *chosen, *plan.overrides, *keys]
    )


# ----------------------------------------------------------------------------------------------
# The model and the data.


def prepare_bench_data(s: BenchSettings, plan: Plan) -> Path:
    """Build the model of `s` and `s.pairs` generated pairs, tokenized in this process into the
    Parquet layout `IndexedPairSource` reads -> the train split directory."""
    from dpo_cluster.bench.train_data import prepare_in_process, write_bench_pairs
    from dpo_cluster.bench.train_stages import build_bench_model
    from dpo_cluster.modeling import load_tokenizer

    build_bench_model(s)
    write_bench_pairs(s, load_tokenizer(s.model_dir))
    # Without Ray (the bench's `prepare_pairs` starts Ray Data where Ray is installed).
    return prepare_in_process(run_config(s, plan, s.prepare_dir))


def read_table(split_dir: Path) -> pa.Table:
    """Every row of a split directory, files in name order (as `IndexedPairSource` reads them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted(split_dir.glob("*.parquet"))])


def row_batches(table: pa.Table, size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """(first row, the rows as columns) of consecutive slices of `size` rows; the last may be short."""
    for start in range(0, table.num_rows, size):
        rows = table.slice(start, size)
        yield start, {name: rows.column(name).to_pylist() for name in rows.column_names}


def completion_tokens(table: pa.Table) -> torch.Tensor:
    """(N, 2) completion tokens of each pair (chosen, rejected): the tokens a log-prob sums over."""
    import torch

    return torch.tensor(
        [
            [len(c), len(r)]
            for c, r in zip(*(table.column(k).to_pylist() for k in ("chosen_ids", "rejected_ids")))
        ],
        dtype=torch.float64,
    )


def bf16_tolerance(tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence tolerance in nats of two bf16 computations of a log-prob sum over `tokens`
    (any shape) completion tokens: BF16_TOKEN_NATS x sqrt(tokens)."""
    return BF16_TOKEN_NATS * tokens.sqrt()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The runs and what they compute.


def train_run(config: Config, train_dir: Path) -> list[dict[str, Any]]:
    """`run_local` (the per-worker loop, DeepSpeed, one process) -> its metrics.jsonl training rows."""
    from dpo_cluster.train.local import run_local

    shutil.rmtree(config.output_dir, ignore_errors=True)
    run_local(config, train_dir)
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def score_with_actor_class(
    spec: ReferenceSpec, config: Config, table: pa.Table, out_dir: Path
) -> tuple[pa.Table, str]:
    """The precompute actors' work without Ray: `ReferenceScorer` called on consecutive slices of
    reference.batch_size rows, as Ray Data's `map_batches` feeds it -> (the scored table, also
    written to `out_dir` for `reference.mode: precomputed`; the dtype the scorer's model computes in)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_cluster.reference.scorer import ReferenceScorer

    scorer = ReferenceScorer(spec)
    dtype = str(next(scorer.model.parameters()).dtype).removeprefix("torch.")
    scored = pa.concat_tables(
        [
            scorer(table.slice(start, config.reference.batch_size))
            for start in range(0, table.num_rows, config.reference.batch_size)
        ]
    )
    del scorer
    free_memory()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    pq.write_table(scored, out_dir / "part-0.parquet")
    return scored, dtype


def in_loop_reference_logps(
    config: Config, table: pa.Table, device: torch.device, pad_id: int
) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs of `table`'s pairs from the in-loop reference: the model
    `build_setup` loads for reference.mode model (in the compute dtype, dropout off), scored by
    `ReferenceSource.compute_logps` on micro-batches of train.micro_batch_size pairs built in the
    loop's layout (`build_layout`: packed with flash-attn, else padded)."""
    import torch

    from dpo_cluster.modeling import load_reference
    from dpo_cluster.train.setup import ReferenceSource, build_layout, disable_dropout

    reference = load_reference(config.reference_model(), config.reference, config.lora, device=device)
    assert reference is not None, "reference.mode model loads a reference"
    disable_dropout(reference)
    layout = build_layout(config.train, reference, reference, pad_id)
    source = ReferenceSource(
        "model", reference, reference, config.train.ld_alpha, config.train.logps_chunk_size
    )
    values = []
    for _, raw in row_batches(table, config.train.micro_batch_size):
        chosen, rejected = source.compute_logps(layout.build_batch(raw).to(device))
        values.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    del reference, source
    free_memory()
    return torch.cat(values)


@dataclass
class HeadPass:
    """One policy forward and backward of a micro-batch: log-probs (2B,) fp32, completion tokens
    (2B,), and the output head weight's gradient (V, H) fp32 (d sum(logps) / d W)."""

    logps: torch.Tensor
    tokens: torch.Tensor
    head_grad: torch.Tensor


def head_pass(policy: torch.nn.Module, batch: Any, chunk_size: int) -> HeadPass:
    """`sequence_logps` of `batch` with train.logps_chunk_size = `chunk_size` (0: full logits),
    then backward of the summed log-probs."""
    from dpo_cluster.batch.hidden_logps import find_output_head
    from dpo_cluster.batch.logps import sequence_logps

    policy.zero_grad(set_to_none=True)
    logps, _, tokens = sequence_logps(policy, batch, chunk_size=chunk_size)
    logps.sum().backward()
    grad = find_output_head(policy).head.weight.grad
    assert grad is not None, "the output head takes part in the forward"
    result = HeadPass(logps.detach().float().cpu(), tokens.cpu(), grad.float().cpu())
    policy.zero_grad(set_to_none=True)
    return result


def fused_and_full(
    config: Config, table: pa.Table, device: torch.device, chunk_size: int, pad_id: int
) -> tuple[HeadPass, HeadPass]:
    """The policy as the loop loads it (bf16, dropout off, train mode), on the first micro-batch
    in the loop's layout: (fused head, `chunk_size` rows per call; full logits)."""
    from dpo_cluster.modeling import load_policy
    from dpo_cluster.train.setup import build_layout, disable_dropout

    policy = load_policy(config.policy_model(), config.lora, device=device)
    disable_dropout(policy)
    policy.train()
    _, raw = next(row_batches(table, config.train.micro_batch_size))
    batch = build_layout(config.train, policy, None, pad_id).build_batch(raw).to(device)
    passes = head_pass(policy, batch, chunk_size), head_pass(policy, batch, 0)
    del policy
    free_memory()
    return passes


# ----------------------------------------------------------------------------------------------
# The checks.


def run_checks(s: BenchSettings, plan: Plan) -> Report:
    """Every check and figure, in the order that holds one model set in memory at a time."""
    import torch

    from dpo_cluster.config import TrainConfig
    from dpo_cluster.reference.scorer import build_reference_spec

    report = Report()
    device = torch.device(plan.device)
    runs = Path(s.workdir) / "runs"
    train_dir = prepare_bench_data(s, plan)
    table = read_table(train_dir)
    in_loop_config = run_config(s, plan, runs / "in-loop", "reference.mode=model")
    # The actors' batches are cut apart from the loop's micro-batches (other pads, other shapes),
    # as with reference.batch_size 8 and any other train.micro_batch_size.
    micro = s.micro_batch_size
    precompute_config = run_config(
        s,
        plan,
        runs / "precompute",
        "reference.mode=precompute",
        f"reference.num_gpus={1 if s.use_gpu else 0}",
        f"reference.batch_size={micro // 2 if micro > 1 else 2}",
    )
    # The actors' loading settings, and the pad id the loop and the actors both choose: the
    # tokenizer is read once.
    spec = build_reference_spec(precompute_config)
    in_loop: list[dict[str, Any]] | None = None
    with report.guard("a. first-step loss = ln 2 (in-loop reference, run_local)"):
        in_loop = check_ln2(report, in_loop_config, train_dir, device)
    report_figures(report, s, plan, in_loop)
    tolerance: float | None = None
    scored_dir = runs / "scored" / "train"
    with report.guard("b. precompute log-probs = in-loop reference's"):
        scored, dtype = score_with_actor_class(spec, precompute_config, table, scored_dir)
        # The reference must compute as the policy does (reference.dtype auto); an fp32 reference
        # under a bf16 policy is off by more than bf16's own noise, but within the limits below.
        compute = precompute_config.compute_dtype()
        report.check(
            "b. precompute reference dtype = policy compute dtype",
            dtype == compute,
            float(dtype == compute),
            dtype,
            compute,
            "ReferenceScorer's weights (reference.dtype auto)",
        )
        in_loop_logps = in_loop_reference_logps(in_loop_config, table, device, spec.pad_token_id)
        tolerance = check_precompute_logps(report, scored, in_loop_logps, precompute_config)
    with report.guard("b. loss curve: precomputed run = in-loop run"):
        if in_loop is None or tolerance is None:
            raise RuntimeError("needs the in-loop run (a) and the precompute (b) to have run")
        precomputed_config = run_config(s, plan, runs / "precomputed", "reference.mode=precomputed")
        check_loss_curve(report, in_loop, train_run(precomputed_config, scored_dir), s.beta, tolerance)
    with report.guard("c. fused head = full logits"):
        # The loop's chunk size; with the fused head off there (0), the default one is checked.
        chunk_size = in_loop_config.train.logps_chunk_size or TrainConfig.logps_chunk_size
        passes = fused_and_full(in_loop_config, table, device, chunk_size, spec.pad_token_id)
        check_fused_head(report, *passes, chunk_size)
    return report


def check_ln2(report: Report, config: Config, train_dir: Path, device: torch.device) -> list[dict[str, Any]]:
    """Check a, and the timed run of the figures (GPU peak memory reset before it) -> its rows."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = train_run(config, train_dir)
    if device.type == "cuda":
        report.figures["peak_memory_mb"] = torch.cuda.max_memory_allocated() / MB
    gap = abs(rows[0]["loss"] - LN2)
    report.check(
        "a. first-step loss = ln 2 (in-loop reference, run_local)",
        gap <= LN2_TOLERANCE,
        gap,
        f"loss {rows[0]['loss']:.7f}, {gap:.1e} off ln 2",
        f"{LN2_TOLERANCE:.0e}",
        f"{len(rows)} steps, deepspeed.zero_stage {config.deepspeed.zero_stage}",
    )
    free_memory()
    return rows


def check_precompute_logps(report: Report, scored: pa.Table, in_loop: torch.Tensor, config: Config) -> float:
    """Check b, log-probs: every pair's (chosen, rejected) from the scorer (N rows) within
    `bf16_tolerance` of the in-loop reference's (N, 2) -> the largest tolerance, for the loss
    curve's limit."""
    import torch

    precomputed = torch.tensor(
        [scored.column(k).to_pylist() for k in ("ref_chosen_logps", "ref_rejected_logps")],
        dtype=torch.float32,
    ).T
    gap = (precomputed - in_loop).abs().double()
    tolerance = bf16_tolerance(completion_tokens(scored))
    report.check(
        "b. precompute log-probs = in-loop reference's",
        bool((gap <= tolerance).all()),
        gap.max().item(),
        f"max abs diff {gap.max().item():.2e} nats, worst {(gap / tolerance).max().item():.1%} of its limit",
        f"2^-6 sqrt(n) nats (<= {tolerance.max().item():.2f})",
        f"{gap.numel()} sequences, log-probs down to {in_loop.min().item():.0f} nats; scorer batches "
        f"of {config.reference.batch_size} pairs, loop micro-batches of {config.train.micro_batch_size}",
    )
    return float(tolerance.max())


def check_loss_curve(
    report: Report,
    in_loop: list[dict[str, Any]],
    precomputed: list[dict[str, Any]],
    beta: float,
    tolerance: float,
) -> None:
    """Check b, training: the precomputed run's loss per step within 2 beta x tolerance of the
    in-loop run's. A pair's loss -log sigmoid(beta (dc - dr)) is 1-Lipschitz in its logit, and
    reference log-probs `tolerance` off move that logit by at most 2 beta x tolerance (the same
    policy: same weights, pairs and micro-batches, so at step 1 nothing else differs)."""
    limit = 2 * beta * tolerance
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(in_loop, precomputed)]
    report.check(
        "b. loss curve: precomputed run = in-loop run",
        len(precomputed) == len(in_loop) and max(gaps) <= limit,
        max(gaps),
        f"max abs diff {max(gaps):.1e} over {len(gaps)} steps",
        f"2 beta x {tolerance:.2f} = {limit:.1e}",
        "reference.mode precomputed on the scorer's Parquet",
    )
    report.figures["losses"] = {
        "in_loop": [r["loss"] for r in in_loop],
        "precomputed": [r["loss"] for r in precomputed],
    }


def check_fused_head(report: Report, fused: HeadPass, full: HeadPass, chunk_size: int) -> None:
    """Check c: log-probs within `bf16_tolerance` and the head weight's gradients within
    BF16_GRAD_RTOL (relative Frobenius distance) of the full-logits path's."""
    gap = (fused.logps - full.logps).abs().double()
    tolerance = bf16_tolerance(full.tokens.double())
    report.check(
        "c. fused head log-probs = full logits",
        bool((gap <= tolerance).all()),
        gap.max().item(),
        f"max abs diff {gap.max().item():.2e} nats",
        f"2^-6 sqrt(n) nats (<= {tolerance.max().item():.2f})",
        f"train.logps_chunk_size {chunk_size} vs 0, {gap.numel()} sequences",
    )
    distance = ((fused.head_grad - full.head_grad).norm() / full.head_grad.norm().clamp(min=1e-30)).item()
    chunks = math.ceil(int(full.tokens.sum()) / chunk_size)
    limit = BF16_GRAD_RTOL * math.sqrt(chunks)
    report.check(
        "c. fused head weight gradient = full logits",
        distance <= limit,
        distance,
        f"relative distance {distance:.1e}",
        f"2^-6 sqrt(chunks={chunks}) = {limit:.1e}",
        f"norm(dW - dW_full) / norm(dW_full), W {tuple(full.head_grad.shape)}",
    )


def report_figures(report: Report, s: BenchSettings, plan: Plan, rows: list[dict[str, Any]] | None) -> None:
    """Check d: the device, versions, kernel, and the in-loop run's throughput, memory and MFU."""
    import torch
    import transformers

    gpu = plan.device == "cuda"
    device = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **{name: _version(name) for name in ("deepspeed", "flash_attn")},
    }
    report.figure("d. device", "device", device, device, ", ".join(f"{k} {v}" for k, v in versions.items()))
    report.figures["versions"] = versions
    kernel = f"{plan.attention}, " + ("packed (varlen)" if plan.packing else "padded")
    report.figure("d. attention", "attention", plan.attention, kernel)
    from dpo_cluster.bench.train_stages import count_model_parameters

    parameters = count_model_parameters(s.model_dir)
    shape = f"{s.shape} shape, layers {s.model_shape()['num_layers']}, random weights"
    report.figure("d. parameters", "parameters", parameters, f"{parameters / 1e6:.1f} M", shape)
    if not rows:
        return
    timed = rows[1:] or rows  # the first step pays for warm-up (allocator, kernel selection)
    tokens = sum(r["tokens_per_second"] * r["seconds_per_step"] for r in timed)
    per_second = tokens / sum(r["seconds_per_step"] for r in timed)
    report.figure(
        "d. steps",
        "steps",
        len(rows),
        str(len(rows)),
        f"{s.micro_batch_size} pairs each, max_length {s.max_length}",
    )
    report.figure(
        "d. tokens/s",
        "tokens_per_second",
        per_second,
        f"{per_second:,.0f}",
        f"non-pad tokens, steps {rows.index(timed[0]) + 1}-{len(rows)}, in-loop reference",
    )
    peak_mb = report.figures.get("peak_memory_mb")
    report.figure(
        "d. peak GPU memory",
        "peak_memory_mb",
        peak_mb,
        "n/a" if peak_mb is None else f"{peak_mb:,.0f} MB",
        "torch.cuda.max_memory_allocated, in-loop run",
    )
    peak = plan.peak_tflops or (_known_peak_tflops(device) if gpu else None)
    mfu = 6 * parameters * per_second / (peak * 1e12) if peak else None
    report.figures["peak_tflops"] = peak
    report.figure(
        "d. MFU",
        "mfu",
        mfu,
        "n/a" if mfu is None else f"{mfu:.1%}",
        f"6 N tokens/s over {peak} TFLOP/s bf16"
        if peak
        else ("--peak-tflops for this device" if gpu else "no bf16 peak on CPU"),
    )


def _known_peak_tflops(device: str) -> float | None:
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in device), None)


def _version(module: str) -> str | None:
    """A package's version without importing it (deepspeed's import starts its accelerator)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# The table and files.


def format_table(report: Report, s: BenchSettings, plan: Plan) -> str:
    """A title line and one Markdown table of every row (checks, then figures)."""
    title = (
        f"dpo-cluster GPU check: {'PASS' if report.passed else 'FAIL'} ({plan.device}, bf16, "
        f"{s.shape}, deepspeed.zero_stage {plan.zero_stage}, {report.figures['seconds']:.0f} s)"
    )
    lines = [title, "", "| check | result | measured | limit | note |", "|---|---|---|---|---|"]
    for row in sorted(report.rows, key=lambda r: r.passed is None):
        result = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
        lines.append(f"| {row.name} | {result} | {row.value} | {row.limit} | {row.note} |")
    return "\n".join(lines)


def write_outputs(path: Path, report: Report, s: BenchSettings, plan: Plan, table: str) -> None:
    """`path`: {passed, checks, figures, settings, plan, table} as JSON; the table as Markdown
    beside it (`path` with suffix .md)."""
    checks = [asdict(row) for row in report.rows if row.passed is not None]
    payload = {
        "passed": report.passed,
        "checks": checks,
        "figures": report.figures,
        "settings": asdict(s),
        "plan": asdict(plan),
        "table": table,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
