"""Names that might be local paths, and directories installed whole or not at all.

Model and data names are hub ids or local paths; one rule tells them apart everywhere, so a
typo'd path is reported as a missing directory instead of being sent to a hub. Built models and
caches are written beside their target and renamed into place, so a concurrent reader never sees
half a directory and a killed writer leaves only a staging directory nothing trusts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

LOCAL_PREFIXES = ("/", ".", "~")


def looks_local(name: str | os.PathLike[str] | None) -> bool:
    """True when `name` is spelled as a filesystem path ("/x", "./x", "../x", "~/x", "."), not a hub id.

    A hub id is "owner/name" or "name": it never starts with "/", "." or "~".
    """
    if name is None:
        return False
    text = os.fspath(name)
    return text.startswith(LOCAL_PREFIXES) or os.path.isabs(text)


def install_directory(
    staging: Path, target: Path, *, is_complete: Callable[[Path], bool] = lambda p: p.is_dir()
) -> Path:
    """Rename the complete `staging` directory to `target` (atomic on one filesystem) and return `target`.

    An incomplete directory already at `target` (an older layout, a failed attempt) is moved aside
    and removed first. When another process installed a complete `target` first, its copy wins and
    `staging` is removed; if `target` is still incomplete then, the rename's error is raised.
    """
    if target.exists() and not is_complete(target):
        stale = target.with_name(f".stale-{target.name}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):  # another process moved it already
            target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not is_complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
