"""Name resolution for pretrained artefacts: hub ids and paths pass through, built-ins are built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo_cluster.modeling import load_tokenizer, resolve_name_or_path


def test_hub_ids_and_paths_pass_through() -> None:
    assert resolve_name_or_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_name_or_path("/models/llama") == "/models/llama"


def test_builtin_tiny_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_CLUSTER_CACHE", str(tmp_path))
    path = Path(resolve_name_or_path("builtin:tiny"))
    assert path.parent == tmp_path and (path / "tokenizer.json").exists()
    stamp = os.stat(path / "tokenizer.json").st_mtime_ns
    assert resolve_name_or_path("builtin:tiny") == str(path)
    assert os.stat(path / "tokenizer.json").st_mtime_ns == stamp  # reused, not rebuilt
    tokenizer = load_tokenizer("builtin:tiny")
    assert tokenizer.decode(tokenizer("标题 ✨")["input_ids"]) == "标题 ✨"


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown built-in 'builtin:huge'; available: builtin:tiny"):
        resolve_name_or_path("builtin:huge")
