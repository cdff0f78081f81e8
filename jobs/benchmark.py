r"""Ray job entrypoint: the benchmarks, `dpo-cluster bench <data|serve|train> ...`, on a cluster node.

Submit from the repository root to a running cluster (token auth on; see README), with
dpo-cluster importable on the cluster (installed on every node, or shipped as the working_dir
with its dependencies on the nodes, as runtime_env.yaml describes):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/benchmark.py train --steps 20 --output bench_train.json

The first argument picks the benchmark; the rest are its flags (`dpo-cluster bench train --help`).
The table is printed to the job's log (`ray job logs -f`); --output writes on the driver's node.
`bench train` measures the node the job's driver runs on: its Ray stages (data preparation, the
reference precompute) start a local Ray instance there rather than join the cluster, so that their
memory is counted, and its training modes run without Ray. `bench data` and `bench serve` use the
job's cluster.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main as cli_main

BENCHMARKS = ("data", "serve", "train")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        return cli_main(["bench", *args])
    if not args or args[0] not in BENCHMARKS:
        print(f"usage: python jobs/benchmark.py {{{','.join(BENCHMARKS)}}} [flags]", file=sys.stderr)
        return 2
    return cli_main(["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
