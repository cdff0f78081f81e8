"""Ray job entrypoint: prepare preference data with Ray Data (report, quarantine, Parquet).

Submit from the repository root to a running cluster (token auth on; see README), with
dpo-cluster installed in the cluster's Python environment (`pip install -e .` on every node):

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/sample_prepare.yaml

Inside the job RAY_ADDRESS is set, so the run joins the cluster instead of starting one.
"""

from __future__ import annotations

import sys

from dpo_cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
