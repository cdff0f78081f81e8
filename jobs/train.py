r"""Ray job entrypoint: DPO training (prepares the data first, then Ray Train + DeepSpeed).

Submit from the repository root to a running cluster (token auth on; see README):

    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/train.py --config configs/qwen2.5-0.5b-youtube-titles_smoke.yaml

Arguments are those of `dpo-cluster train`: `--config FILE` and dotted overrides
(`train.learning_rate=5e-4 output_dir=/mnt/shared/run-1`). The job's working directory is the
uploaded checkout, so relative paths in the config resolve against it; outputs belong on storage
every node reaches. Inside the job RAY_ADDRESS is set, so the run joins the cluster instead of
starting one. On Kubernetes the same entrypoint runs in k8s/ray-job.dpo-train.yaml.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
