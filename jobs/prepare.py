r"""Ray job entrypoint: prepare preference data with Ray Data (report, quarantine, Parquet).

Submit from the repository root to a running cluster (token auth on; see README):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/prepare.py --config configs/sample_prepare.yaml

Arguments are those of `dpo-cluster prepare`: `--config FILE` and dotted overrides. Inside the job
RAY_ADDRESS is set, so the run joins the cluster instead of starting one.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
