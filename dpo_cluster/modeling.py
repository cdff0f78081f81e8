"""Loading pretrained artefacts by name: Hugging Face hub ids, local directories, and the
project's own built-in tiny models ("builtin:tiny"), which are built on first use into a cache
directory so examples and tests run with no model hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dpo_cluster import __version__

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny",)


def cache_dir() -> Path:
    """Where built-in artefacts live: $DPO_CLUSTER_CACHE, else ~/.cache/dpo-cluster."""
    return Path(os.environ.get("DPO_CLUSTER_CACHE", Path.home() / ".cache" / "dpo-cluster"))


def resolve_name_or_path(name_or_path: str) -> str:
    """A hub id or path as is; "builtin:NAME" -> a local directory, built if missing."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise ValueError(
            f"unknown built-in {name_or_path!r}; available: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
        )
    from dpo_cluster.tiny import build_tiny_tokenizer

    target = cache_dir() / f"{name}-{__version__}"
    if not (target / "tokenizer.json").exists():
        # Build beside the target and rename, so concurrent first uses never see half a directory.
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        build_tiny_tokenizer(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained` with built-in names resolved."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_name_or_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
    )
