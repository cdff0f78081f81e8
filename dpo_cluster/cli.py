"""The `dpo-cluster` command line.

    dpo-cluster {prepare,train,eval,serve,bench} --config PATH [dotted.key=value ...]
    dpo-cluster demo
    dpo-cluster bench data [--rows N]

Errors the user can fix (config, data) print one clear message and exit 2, never a traceback.
`python jobs/<name>.py --config PATH [overrides]` runs the same commands inside a Ray job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from dpo_cluster.config import ConfigError, load_config
from dpo_cluster.data.records import DataError

EXIT_USAGE = 2
NOT_YET = {
    "eval": "evaluation of a tuned model against its base",
    "serve": "the side-by-side Ray Serve app and A/B arena",
    "demo": "the end-to-end demo",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, DataError) as e:
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

    for name, what in NOT_YET.items():
        p = sub.add_parser(name, help=f"{what} (not available yet)")
        if name != "demo":
            _add_config_args(p)
        p.set_defaults(run=_not_yet(name, what))

    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios against a peer")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("data", help="this pipeline vs TRL's datasets.map preprocessing, rows/s")
    b.add_argument("--rows", type=int, default=20_000, help="generated preference pairs (default 20000)")
    b.add_argument(
        "--num-proc", type=int, default=None, help="processes for TRL's datasets.map (default: CPUs)"
    )
    b.add_argument("--output", default=None, help="also write the results as JSON to this path")
    b.set_defaults(run=cmd_bench_data)
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_length=512"
    )


def _not_yet(name: str, what: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"dpo-cluster {name}: {what} is not available yet in this version.", file=sys.stderr)
        return EXIT_USAGE

    return run


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
    print(f"model: {result.final_dir}")
    print(f"metrics: {result.final_dir.parent / 'metrics.jsonl'}")
    curves = result.final_dir.parent / "training_curves.png"
    if curves.exists():
        print(f"curves: {curves}")
    return 0


def format_report(report: dict) -> str:
    """A short table of the data report for the terminal."""
    lines = [f"{'split':<6} {'rows_in':>8} {'kept':>8} {'dropped':>8}  reasons"]
    for split, stats in report["splits"].items():
        reasons = ", ".join(f"{r}={n}" for r, n in stats["dropped"].items()) or "-"
        dropped = sum(stats["dropped"].values())
        lines.append(f"{split:<6} {stats['rows_in']:>8} {stats['rows_kept']:>8} {dropped:>8}  {reasons}")
    for role, source in report.get("sources", {}).items():
        lines.append(f"{role} source: {source['source']} (format: {source['format']})")
    return "\n".join(lines)


def cmd_bench_data(args: argparse.Namespace) -> int:
    from dpo_cluster.bench.data import run_data_benchmark

    result = run_data_benchmark(rows=args.rows, num_proc=args.num_proc)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
