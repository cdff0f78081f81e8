r"""Ray job entrypoint: evaluation of a tuned model against its base (reward accuracy on the eval
split, win rate on a prompt set by a rule, a reward model or the arena's votes).

Submit from the repository root to a running cluster (token auth on; see README):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/sample_train.yaml evaluation.rule=title_length

Arguments are those of `dpo-cluster eval`. Inside the job RAY_ADDRESS is set, so data preparation
joins the cluster.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
