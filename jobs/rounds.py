r"""Ray job entrypoint: on-policy preference rounds (sample, judge, pair, DPO, evaluate, again).

Submit from the repository root to a running cluster (token auth on; see README):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/rounds.py --config configs/sample_rounds.yaml

Arguments are those of `dpo-cluster rounds`: `--config FILE` and dotted overrides
(`rounds.num_rounds=3 output_dir=/mnt/shared/rounds-1`). Each round's training joins the job's
cluster (RAY_ADDRESS is set inside a job); sampling and evaluation run in the job's driver, so give
the head node the memory of one model. A resubmitted job with the same output_dir resumes at the
first incomplete round; outputs belong on storage every node reaches.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["rounds", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
