"""Starting or joining Ray the way every dpo-cluster command does.

One place decides it, so `prepare`, training, serving and the benchmarks all land on the same
cluster: the one `ray job submit` or RAY_ADDRESS names, else a local one started here.
"""

from __future__ import annotations


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`'s), else start a local one."""
    import ray

    if not ray.is_initialized():
        # The dashboard (on 127.0.0.1 only) also serves the State API that Ray Train uses to
        # watch its controller; without it Ray Train logs a warning every few seconds.
        ray.init(log_to_driver=True)
