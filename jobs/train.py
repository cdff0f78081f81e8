"""Ray job entrypoint: DPO training (prepares the data first, then Ray Train + DeepSpeed).

Submit from the repository root to a running cluster (token auth on; see README), with
dpo-cluster importable on the cluster (installed on every node, or shipped as the working_dir
with its dependencies in the runtime env, as k8s/ray-job.dpo-train.yaml does):

    ray job submit --working-dir . -- python jobs/train.py --config configs/sample_train.yaml

Inside the job RAY_ADDRESS is set, so the run joins the cluster instead of starting one.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
