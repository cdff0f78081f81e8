"""The `dpo-cluster` command line: one subcommand per program, each a thin call into the library.

    dpo-cluster {prepare,train,rounds,eval,serve} --config PATH [dotted.key=value ...]
    dpo-cluster demo [--model builtin:demo] [--no-serve]
    dpo-cluster bench {data,serve,train,gpu} [flags]

Errors the user can fix (config, data, a RAY_ADDRESS nothing answers at, a judge endpoint that
refuses) print one clear message and exit 2, never a traceback, so that a typo'd key reads as a
typo. `python jobs/<name>.py` runs the same commands in a Ray job.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dpo_cluster.config import ConfigError, load_config
from dpo_cluster.data.records import DataError
from dpo_cluster.ray_session import RayUnreachableError
from dpo_cluster.rounds.http_json import JudgeHTTPError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, DataError, RayUnreachableError, JudgeHTTPError) as e:
        print(f"dpo-cluster {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-cluster", description="DPO on a Ray cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize preference pairs with Ray Data; write data_report.json")
    _add_config_args(p)
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("train", help="DPO on Ray Train + DeepSpeed (prepares the data first)")
    _add_config_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "rounds",
        help="on-policy rounds: the policy samples, a judge picks, DPO trains the next policy, again",
    )
    _add_config_args(p)
    p.set_defaults(run=cmd_rounds)

    _add_serve_parser(sub)
    _add_eval_parser(sub)
    _add_demo_parser(sub)
    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios against a peer")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    _add_bench_data_parser(bench)
    _add_bench_serve_parser(bench)
    _add_bench_train_parser(bench)
    _add_bench_gpu_parser(bench)
    return parser


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="base and tuned side by side on Ray Serve: OpenAI API, /v1/compare, A/B arena",
        description="Serve base and tuned models side by side. Give --config (serves model.name_or_path "
        "and output_dir/final), or --base and --tuned, or both (the flags win).",
    )
    p.add_argument("--config", default=None, help="YAML config file (its serve section)")
    p.add_argument("--base", default=None, help="base model: hub id, directory or builtin:tiny")
    p.add_argument("--tuned", default=None, help="tuned model: a run's final/ (full model or LoRA adapter)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.port=8080")
    p.set_defaults(run=cmd_serve)


def _add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="tuned vs base: held-out reward accuracy and a judged win rate; writes eval_report.json",
        description="Evaluate a tuned model against its base (the DPO reference): reward accuracy on the "
        "eval split, and the win rate of tuned over base on a prompt set by a judge (evaluation.* keys).",
    )
    _add_config_args(p)
    p.add_argument("--tuned", default=None, help="tuned model: a run's final/ (full model or LoRA adapter)")
    p.add_argument(
        "--base", default=None, help="base model (the reference): hub id, directory or builtin:tiny"
    )
    p.add_argument(
        "--judge", default=None, choices=["rule", "reward_model", "arena"], help="who decides the win rate"
    )
    p.add_argument("--output", default=None, help="the JSON report (default: output_dir/eval_report.json)")
    p.set_defaults(run=cmd_eval)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole system offline: a real model samples, a rule judges, DPO trains, evaluation, serving",
        description="One on-policy preference round on SmolLM2-135M-Instruct (video titles judged by a rule), "
        "then evaluation on held-out ideas, a report, and serving base and tuned side by side. "
        "--model builtin:demo runs the faster demo on the project's own toy model.",
    )
    p.add_argument(
        "--output-dir", default="outputs/demo", help="where everything goes (default outputs/demo)"
    )
    p.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="the base model (default builtin:smollm2-135m-instruct; builtin:demo: the toy demo)",
    )
    p.add_argument("--ideas", type=int, default=64, help="video ideas the round samples on (default 64)")
    p.add_argument("--held-out", type=int, default=200, help="held-out ideas evaluated on (default 200)")
    p.add_argument(
        "--pairs", type=int, default=3000, help="toy demo only: preference pairs to generate (default 3000)"
    )
    p.add_argument("--no-serve", action="store_true", help="stop after the report; do not start Serve")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.port=8080")
    p.set_defaults(run=cmd_demo)


def _add_bench_data_parser(bench: Any) -> None:
    b = bench.add_parser("data", help="this pipeline vs TRL's datasets.map preprocessing, rows/s")
    b.add_argument(
        "--rows",
        type=int,
        default=None,
        help="generated preference pairs (default 20000; 1000000 with --scale)",
    )
    b.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="processes for TRL's datasets.map (default: CPUs; with --scale TRL runs its default, one)",
    )
    b.add_argument(
        "--scale",
        action="store_true",
        help="at scale: each side in its own process, peak RSS of prepare's driver, Ray workers and "
        "object store vs TRL's, and what each of 2 training readers reads",
    )
    b.add_argument("--output", default=None, help="also write the results as JSON to this path")
    b.set_defaults(run=cmd_bench_data)


def _add_bench_serve_parser(bench: Any) -> None:
    from dpo_cluster.bench.serve import DEFAULT_BASE, BenchPlan

    d = BenchPlan()
    b = bench.add_parser(
        "serve",
        help="serve backends side by side (hf, vllm): one model, streamed TTFT, /v1/compare",
        description="Deploy the serve app once per backend, one after the other, with the same models, "
        "prompts and greedy sampling, and measure with the same concurrent clients: requests/s, output "
        "tokens/s, p50/p95 latency and time to first token, for one model and for /v1/compare.",
    )
    b.add_argument(
        "--backend",
        default="hf,vllm",
        help="comma-separated serve.backend values (auto, hf, vllm), measured in this order "
        "(default hf,vllm); the ratio columns are against the first",
    )
    b.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default {DEFAULT_BASE})")
    b.add_argument(
        "--tuned", default=None, help="tuned model or adapter (default: a LoRA built over the base)"
    )
    b.add_argument(
        "--requests", type=int, default=d.requests, help=f"measured requests per phase (default {d.requests})"
    )
    b.add_argument(
        "--concurrency", type=int, default=d.concurrency, help=f"concurrent clients (default {d.concurrency})"
    )
    b.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"tokens per answer (default {d.max_new_tokens})",
    )
    b.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help=f"uncounted requests before each phase (default {d.warmup})",
    )
    b.add_argument("--port", type=int, default=d.port, help=f"Serve HTTP port (default {d.port})")
    b.add_argument("--api-key-file", default=None, help="serve.api_key_file: serve with this API key")
    b.add_argument("--output", default=None, help="also write all the numbers as JSON to this path")
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="serve.* overrides, e.g. serve.num_cpus=2 (applied last)",
    )
    b.set_defaults(run=cmd_bench_serve)


def _add_bench_train_parser(bench: Any) -> None:
    from dpo_cluster.bench.train_settings import (
        DEFAULT_HIDDEN_SIZE,
        DEFAULT_NUM_LAYERS,
        DEFAULT_SHAPE,
        MODES,
        SHAPES,
        BenchSettings,
    )

    d = BenchSettings(workdir="")
    b = bench.add_parser(
        "train",
        help="DPO training vs TRL's DPOTrainer: tokens/s, s/step, peak memory, same model and pairs",
        description="Train the same model on the same generated pairs with the same hyperparameters and "
        "precision in each mode (one subprocess per mode) and print tokens/s, seconds/step, peak memory, "
        "the model-state floor and what is above it, and padding, with ratios to each TRL mode and to the "
        "faster one. Modes: trl (DPOTrainer), trl-precompute (DPOTrainer, precompute_ref_log_probs), "
        "dpo-cluster (in-loop reference, padded), dpo-cluster-fast (precomputed reference, packed).",
    )
    b.add_argument(
        "--model", default=None, help="hub id, directory or builtin:NAME (default: a Qwen2 built here)"
    )
    b.add_argument(
        "--shape",
        choices=[DEFAULT_SHAPE, *SHAPES],
        default=DEFAULT_SHAPE,
        help="the built model: default (Qwen2 proportions of --hidden-size) or a published config with "
        "random weights and its full vocabulary",
    )
    b.add_argument(
        "--hidden-size", type=int, default=None, help=f"default shape only (default {DEFAULT_HIDDEN_SIZE})"
    )
    b.add_argument(
        "--layers",
        "--num-layers",
        dest="layers",
        type=int,
        default=None,
        help=f"layers of the built model (default: {DEFAULT_NUM_LAYERS}, or the shape's own)",
    )
    b.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU")
    b.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if present"
    )
    b.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps}; >= 2)")
    b.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="pairs per forward")
    b.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    b.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens (default {d.max_length})")
    b.add_argument("--beta", type=float, default=d.beta)
    b.add_argument("--learning-rate", type=float, default=d.learning_rate)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--gradient-checkpointing", action="store_true", help="in every mode (default off)")
    b.add_argument(
        "--fast-max-tokens",
        type=int,
        default=None,
        help="dpo-cluster-fast: train.max_tokens_per_micro_batch (>= 2 x max length; default: that)",
    )
    b.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    b.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name)")
    b.add_argument("--workdir", default=None, help="keep model, data and logs here (default: a temp dir)")
    b.add_argument("--output", default=None, help="also write the results as JSON to this path")
    b.set_defaults(run=cmd_bench_train)


def _add_bench_gpu_parser(bench: Any) -> None:
    from dpo_cluster.bench.gpu_check import add_arguments

    b = bench.add_parser(
        "gpu",
        help="one-GPU check without Ray: ln 2 first step, precompute = in-loop, fused head; tokens/s, MFU",
        description="Build the 0.5B-class bench model (random weights) and generated pairs, run the "
        "training loop in this process (DeepSpeed, bf16) with the in-loop and with a precomputed "
        "reference, compare the fused log-prob head with full logits, and print one table of PASS/FAIL "
        "checks and figures (peak GPU memory, tokens/s, MFU). Exits 1 when a check fails.",
    )
    add_arguments(b)
    b.set_defaults(run=cmd_bench_gpu)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_length=512"
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    from dpo_cluster.data.pipeline import REPORT_FILE, prepare

    config = load_config(args.config, args.overrides)
    prepared = prepare(config)
    print(format_report(prepared.report))
    state = "reused (cache key matches)" if prepared.cache_hit else "written"
    print(f"\nprepared data {state}: {prepared.prepared_dir}")
    print(f"report: {prepared.output_dir / REPORT_FILE}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dpo_cluster.train.run import run_training

    config = load_config(args.config, args.overrides)
    result = run_training(config)
    shown = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies")
    print("final metrics: " + ", ".join(f"{k}={result.metrics[k]:.4f}" for k in shown if k in result.metrics))
    reference = result.final_dir.parent / "reference_report.json"
    if config.reference.mode == "precompute" and reference.is_file():
        report = json.loads(reference.read_text())
        done = (
            "reused"
            if report["reused"]
            else f"scored {report['rows_scored']} pairs in {report['seconds']:.1f}s "
            f"{'beside' if report.get('overlapped') else 'before'} training"
        )
        print(f"reference log-probs: {done} (cache key {report['cache_key']}): {reference}")
    print(f"model: {result.final_dir}")
    print(f"metrics: {result.final_dir.parent / 'metrics.jsonl'}")
    curves = result.final_dir.parent / "training_curves.png"
    if curves.exists():
        print(f"curves: {curves}")
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from dpo_cluster.rounds.run import run_rounds
    from dpo_cluster.rounds.summary import SUMMARY_FILE, format_rounds

    config = load_config(args.config, args.overrides)
    summary = run_rounds(config)
    print(format_rounds(summary))
    print(f"\nsummary: {config.output_dir}/{SUMMARY_FILE}")
    print(f"plot:    {summary['plot']}")
    print(f"serve every round side by side: dpo-cluster serve --config {summary['serve_config']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dpo_cluster.evaluation.report import format_eval_report
    from dpo_cluster.evaluation.run import run_evaluation

    overrides = list(args.overrides)
    # The flags win over the same keys given as overrides; JSON quoting keeps a path a string.
    overrides += [
        f"evaluation.{key}={json.dumps(value)}"
        for key in ("tuned", "base", "judge", "output")
        if (value := getattr(args, key))
    ]
    config = load_config(args.config, overrides)
    report = run_evaluation(config)
    print(format_eval_report(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dpo_cluster.serving.launch import start_serving, stop_serving

    overrides = list(args.overrides)
    overrides += [
        f"serve.{key}={json.dumps(value)}" for key in ("base", "tuned") if (value := getattr(args, key))
    ]
    config = load_config(args.config, overrides, serving=True)
    try:
        urls = start_serving(config)
    except KeyboardInterrupt:  # interrupted while the replicas were still starting
        stop_serving()
        return 0
    print(f"serving base={config.serve_base()} tuned={config.serve_tuned()}")
    return serve_until_interrupted(config, urls)


def serve_until_interrupted(config: Any, urls: Any) -> int:
    """Print where the app is, then block until Ctrl-C and take the app down."""
    import time

    from dpo_cluster.serving.launch import stop_serving

    key_note = f"requests need 'Authorization: Bearer <key>' (key from ${config.serve.api_key_env}" + (
        f" or {config.serve.api_key_file})" if config.serve.api_key_file else ")"
    )
    print(f"  arena:    {urls.arena}")
    print(f"  compare:  POST {urls.compare}")
    print(f"  OpenAI:   {urls.openai} (models: base, tuned)")
    print(f"  API key:  {key_note}, when one is set")
    print(f"  votes:    {config.arena_db()}")
    print("Ctrl-C stops the app.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the app (Ctrl-C again to exit at once)", flush=True)
    try:
        stop_serving()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpo_cluster.demo.report import TRAINING_SHOWN, live_comparison
    from dpo_cluster.demo.run import run_demo
    from dpo_cluster.evaluation.report import format_eval_report

    result = run_demo(
        args.output_dir,
        model=args.model,
        pairs=args.pairs,
        ideas=args.ideas,
        held_out=args.held_out,
        overrides=args.overrides,
    )
    config, metrics = result["config"], result["metrics"]
    shown = [k for k in TRAINING_SHOWN if isinstance(metrics.get(k), int | float)]
    print("\nfinal training metrics: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in shown))
    print(format_eval_report(result["evaluation"]))
    print(f"\nreport: {result['report']}")
    print(f"curves: {result['report'].parent / 'training_curves.png'}")
    if args.no_serve:
        return 0
    from dpo_cluster.serving.launch import start_serving

    urls = start_serving(config)
    print(f"\nserving base={config.serve_base()} tuned={config.serve_tuned()}")
    print(live_comparison(urls.compare, config, result["prompt"]))
    return serve_until_interrupted(config, urls)


def format_report(report: dict) -> str:
    """A short table of the data report for the terminal."""
    lines = [f"{'split':<6} {'rows_in':>8} {'kept':>8} {'dropped':>8}  reasons"]
    for split, stats in report["splits"].items():
        reasons = ", ".join(f"{r}={n}" for r, n in stats["dropped"].items()) or "-"
        dropped = sum(stats["dropped"].values())
        lines.append(f"{split:<6} {stats['rows_in']:>8} {stats['rows_kept']:>8} {dropped:>8}  {reasons}")
    for role, source in report.get("sources", {}).items():
        lines.append(f"{role} source: {source['source']} (format: {source['format']})")
        for entry in source.get("mix", []):  # several sources, or a weight: each one's share
            reasons = ", ".join(f"{r}={n}" for r, n in entry["dropped"].items()) or "-"
            lines.append(
                f"  {entry['key']:<14} weight {entry['weight']:<6g} rows_in {entry['rows_in']:>8} kept "
                f"{entry['rows_kept']:>8} (copies {entry['copies']})  {entry['source']} ({entry['format']})  {reasons}"
            )
    return "\n".join(lines)


def cmd_bench_data(args: argparse.Namespace) -> int:
    if args.scale:
        from dpo_cluster.bench.data_scale import SCALE_ROWS, run_scale_benchmark

        result = run_scale_benchmark(rows=args.rows or SCALE_ROWS)
    else:
        from dpo_cluster.bench.data import run_data_benchmark

        result = run_data_benchmark(rows=args.rows or 20_000, num_proc=args.num_proc)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from dpo_cluster.bench.serve import BenchPlan, parse_backends, run_serve_benchmark

    plan = BenchPlan(
        backends=parse_backends(args.backend),
        base=args.base,
        tuned=args.tuned,
        requests=args.requests,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        warmup=args.warmup,
        port=args.port,
        api_key_file=args.api_key_file,
        overrides=tuple(args.overrides),
    )
    result = run_serve_benchmark(plan)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from dpo_cluster.bench.train import run_benchmark
    from dpo_cluster.bench.train_settings import BenchSettingsError

    try:
        run_benchmark(
            modes=[m.strip() for m in args.modes.split(",") if m.strip()],
            dtype=args.dtype,
            device=args.device,
            output=args.output,
            workdir=args.workdir,
            peak_tflops=args.peak_tflops,
            model=args.model,
            shape=args.shape,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            steps=args.steps,
            micro_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_length=args.max_length,
            beta=args.beta,
            learning_rate=args.learning_rate,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
            fast_max_tokens=args.fast_max_tokens,
        )
    except BenchSettingsError as e:  # a flag out of range or in conflict, found before anything runs
        print(f"dpo-cluster bench train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from dpo_cluster.bench.gpu_check import run_check

    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
