"""`dpo_cluster.paths`: the local-path rule and the atomic directory install."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo_cluster.paths import install_directory, looks_local


@pytest.mark.parametrize("name", ["/abs/dir", "./rel", "../up", "~/home", ".", "..", Path("/p")])
def test_paths_look_local(name: str | Path) -> None:
    assert looks_local(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "builtin:tiny", "", None])
def test_hub_ids_and_names_do_not(name: str | None) -> None:
    assert not looks_local(name)


def _complete(path: Path) -> bool:
    return (path / "done").exists()


def _staged(parent: Path, name: str, content: str) -> Path:
    staging = parent / name
    staging.mkdir()
    (staging / "done").write_text(content)
    return staging


def test_install_renames_staging_into_place(tmp_path: Path) -> None:
    target = tmp_path / "model"
    staging = _staged(tmp_path, ".tmp-1", "a")
    assert install_directory(staging, target, is_complete=_complete) == target
    assert (target / "done").read_text() == "a" and not staging.exists()


def test_an_incomplete_target_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "half").write_text("old layout")
    install_directory(_staged(tmp_path, ".tmp-1", "new"), target, is_complete=_complete)
    assert sorted(os.listdir(target)) == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no stale or staging leftovers


def test_a_complete_target_installed_first_wins(tmp_path: Path) -> None:
    target = _staged(tmp_path, "model", "first")
    install_directory(_staged(tmp_path, ".tmp-2", "second"), target, is_complete=_complete)
    assert (target / "done").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_rename_without_a_complete_target_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        install_directory(tmp_path / ".tmp-missing", tmp_path / "model", is_complete=_complete)
