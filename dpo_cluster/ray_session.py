"""Starting or joining Ray the way every dpo-cluster command does.

One place decides it, so `prepare`, training, serving and the benchmarks all land on the same
cluster: the one `ray job submit` or RAY_ADDRESS names, else a local one started here. The address
is probed first, because `ray.init` retries a dead one for minutes before it fails.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

# A live GCS accepts a TCP connection at once; a dead host or closed port answers within this or
# never. Short, since every command pays it before joining.
GCS_PROBE_TIMEOUT_S = 2.5
FROM_ENV = "RAY_ADDRESS"


class RayUnreachableError(RuntimeError):
    """The cluster the user asked for (RAY_ADDRESS) does not answer: a one-line, fixable error."""


def requested_address() -> tuple[str | None, str]:
    """The GCS address `ray.init()` would join and where it came from: RAY_ADDRESS (its source
    starts with "RAY_ADDRESS"), else the file `ray start` records, else (None, "")."""
    from ray._common.utils import get_ray_address_file

    # The same file ray.init reads (RAY_TMPDIR / TMPDIR decide where), so both see one address.
    address_file = get_ray_address_file(None)
    recorded = None
    if os.path.isfile(address_file):
        with open(address_file) as f:
            recorded = f.read().strip() or None
    env = os.environ.get(FROM_ENV, "").strip()
    if env == "auto":  # asked for, and it means the recorded one
        return recorded, f"{FROM_ENV}=auto, recorded in {address_file}"
    if env == "local" or "://" in env:  # starts its own, or a Ray client address: ray.init's
        return None, FROM_ENV
    if env:
        return env, FROM_ENV
    return recorded, (address_file if recorded else "")


def gcs_answers(address: str, timeout: float = GCS_PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at `host:port` within `timeout` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):  # refused, unreachable, timed out, or no port to dial
        return False


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`'s), else start a local one.

    Raises RayUnreachableError when RAY_ADDRESS names a cluster that does not answer. An address
    left behind by a `ray start` head that died without `ray stop` is warned about and skipped.
    """
    import ray

    if ray.is_initialized():
        return
    address, source = requested_address()
    start_local = False
    # Inside `ray job submit` RAY_ADDRESS names the job's own live cluster: the probe just passes.
    if address is not None and not gcs_answers(address):
        if source.startswith(FROM_ENV):
            raise RayUnreachableError(
                f"Ray cluster at {address} (from {source}) does not answer; start it, "
                f"or unset {FROM_ENV} to start a local Ray here"
            )
        logger.warning(
            "Ray cluster at %s (recorded by `ray start` in %s) does not answer; starting a local "
            "Ray instead (`ray stop` clears the stale record)",
            address,
            source,
        )
        start_local = True  # nobody asked for that cluster, so a fresh one serves as well
    # The dashboard (on 127.0.0.1 only) also serves the State API that Ray Train uses to
    # watch its controller; without it Ray Train logs a warning every few seconds.
    ray.init(address="local" if start_local else None, log_to_driver=True)
