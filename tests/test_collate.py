"""Tests for dpo_cluster.batch.collate: literal tensors, parity with TRL 1.16's
`DataCollatorForPreference` on random rows, the numpy shapes Ray Data hands out, and bad input."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from dpo_cluster.batch.collate import PreferenceBatch, collate_pairs

# The example of TRL's docstring, with reference log-probs added.
TWO_PAIRS: dict[str, Any] = {
    "prompt_ids": [[1, 2, 3], [7, 8]],
    "chosen_ids": [[4, 5], [9]],
    "rejected_ids": [[6], [10, 11]],
}


def test_two_pairs_literal() -> None:
    batch = collate_pairs(
        {**TWO_PAIRS, "ref_chosen_logps": [-1.5, -2.0], "ref_rejected_logps": [-3.0, -0.5]}, 0
    )
    # Rows: pair 0 chosen, pair 1 chosen, pair 0 rejected, pair 1 rejected; T = 3 + 2 = 5.
    assert torch.equal(
        batch.input_ids,
        torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]),
    )
    assert torch.equal(
        batch.attention_mask,
        torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]),
    )
    assert torch.equal(
        batch.completion_mask,
        torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]),
    )
    for tensor in (batch.input_ids, batch.attention_mask, batch.completion_mask):
        assert tensor.dtype == torch.long
    assert batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None
    assert batch.ref_chosen_logps.dtype == torch.float32
    assert torch.equal(batch.ref_chosen_logps, torch.tensor([-1.5, -2.0]))
    assert torch.equal(batch.ref_rejected_logps, torch.tensor([-3.0, -0.5]))
    assert batch.num_pairs == 2
    assert batch.num_tokens == 5 + 3 + 4 + 4
    # 20 entries, 16 tokens: 4 pads.
    assert batch.input_ids.numel() - batch.num_tokens == 4


def test_pad_to_multiple_of_and_pad_token_literal() -> None:
    batch = collate_pairs(TWO_PAIRS, pad_token_id=99, pad_to_multiple_of=4)
    # T = 5 rounds up to 8.
    assert torch.equal(
        batch.input_ids,
        torch.tensor(
            [
                [1, 2, 3, 4, 5, 99, 99, 99],
                [7, 8, 9, 99, 99, 99, 99, 99],
                [1, 2, 3, 6, 99, 99, 99, 99],
                [7, 8, 10, 11, 99, 99, 99, 99],
            ]
        ),
    )
    assert torch.equal(
        batch.attention_mask,
        torch.tensor(
            [
                [1, 1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
            ]
        ),
    )
    assert torch.equal(
        batch.completion_mask,
        torch.tensor(
            [
                [0, 0, 0, 1, 1, 0, 0, 0],
                [0, 0, 1, 0, 0, 0, 0, 0],
                [0, 0, 0, 1, 0, 0, 0, 0],
                [0, 0, 1, 1, 0, 0, 0, 0],
            ]
        ),
    )
    assert batch.ref_chosen_logps is None and batch.ref_rejected_logps is None
    assert batch.input_ids.numel() - batch.num_tokens == 16  # of 32 entries
    # Already a multiple: unchanged.
    assert collate_pairs(TWO_PAIRS, 0, pad_to_multiple_of=5).input_ids.shape == (4, 5)


def _random_rows(rng: random.Random, num_pairs: int, with_ref: bool) -> list[dict[str, Any]]:
    rows = []
    for _ in range(num_pairs):
        row: dict[str, Any] = {
            "prompt_ids": [rng.randrange(1, 500) for _ in range(rng.randrange(0, 12))],
            "chosen_ids": [rng.randrange(1, 500) for _ in range(rng.randrange(1, 9))],
            "rejected_ids": [rng.randrange(1, 500) for _ in range(rng.randrange(1, 9))],
        }
        if with_ref:
            row["ref_chosen_logps"] = -rng.random() * 20
            row["ref_rejected_logps"] = -rng.random() * 20
        rows.append(row)
    return rows


def _ray_numpy_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Columns as Ray Data's numpy batches carry them: list<int32> columns as object arrays of 1-D
    int32 arrays, float columns as read-only float64 arrays."""
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name.endswith("_ids"):
            column = np.empty(len(rows), dtype=object)
            for i, row in enumerate(rows):
                column[i] = np.asarray(row[name], dtype=np.int32)
        else:
            column = np.asarray([row[name] for row in rows], dtype=np.float64)
            column.setflags(write=False)
        columns[name] = column
    return columns


@pytest.mark.parametrize("seed", range(6))
def test_matches_trl_collator_on_random_rows(seed: int) -> None:
    rng = random.Random(seed)
    rows = _random_rows(rng, num_pairs=rng.randrange(1, 7), with_ref=seed % 2 == 0)
    pad_token_id = rng.choice([0, 3, 151643])
    pad_to_multiple_of = [None, 8][seed % 3 == 0]
    expected = DataCollatorForPreference(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)(
        rows
    )
    for columns in ({name: [row[name] for row in rows] for name in rows[0]}, _ray_numpy_columns(rows)):
        batch = collate_pairs(columns, pad_token_id, pad_to_multiple_of)
        for name in ("input_ids", "attention_mask", "completion_mask"):
            ours = getattr(batch, name)
            assert ours.dtype == expected[name].dtype, name
            assert torch.equal(ours, expected[name]), name
        if seed % 2 == 0:
            for name in ("ref_chosen_logps", "ref_rejected_logps"):
                assert getattr(batch, name).dtype == expected[name].dtype == torch.float32
                assert torch.equal(getattr(batch, name), expected[name]), name
        else:
            assert batch.ref_chosen_logps is None and "ref_chosen_logps" not in expected


def test_equal_length_rows_as_2d_arrays_and_extra_columns() -> None:
    # When every row has the same length a column may arrive as one (B, L) array.
    columns = {
        "row_id": np.array(["a", "b"]),
        "prompt_ids": np.array([[5, 6], [7, 8]], dtype=np.int32),
        "chosen_ids": np.array([[1], [2]], dtype=np.int32),
        "rejected_ids": np.array([[3], [4]], dtype=np.int32),
    }
    batch = collate_pairs(columns, 0)
    assert torch.equal(batch.input_ids, torch.tensor([[5, 6, 1], [7, 8, 2], [5, 6, 3], [7, 8, 4]]))
    assert torch.equal(batch.completion_mask, torch.tensor([[0, 0, 1]] * 4))
    assert batch.num_tokens == batch.input_ids.numel()  # no padding


def test_read_only_ray_buffers_are_copied() -> None:
    ref = np.array([-1.0, -2.0], dtype=np.float32)
    ref.setflags(write=False)
    batch = collate_pairs({**TWO_PAIRS, "ref_chosen_logps": ref, "ref_rejected_logps": ref}, 0)
    assert batch.ref_chosen_logps is not None
    batch.ref_chosen_logps.add_(1.0)
    assert ref.tolist() == [-1.0, -2.0]


def test_to_moves_every_tensor() -> None:
    batch = collate_pairs({**TWO_PAIRS, "ref_chosen_logps": [0.0, 1.0], "ref_rejected_logps": [2.0, 3.0]}, 0)
    moved = batch.to("meta")
    assert isinstance(moved, PreferenceBatch)
    assert all(
        t is not None and t.device.type == "meta"
        for t in (
            moved.input_ids,
            moved.attention_mask,
            moved.completion_mask,
            moved.ref_chosen_logps,
            moved.ref_rejected_logps,
        )
    )
    assert batch.input_ids.device.type == "cpu"
    assert collate_pairs(TWO_PAIRS, 0).to("cpu").ref_chosen_logps is None


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}, "empty"),
        (
            {
                "prompt_ids": np.empty(0, dtype=object),
                "chosen_ids": np.empty(0, dtype=object),
                "rejected_ids": np.empty(0, dtype=object),
            },
            "empty",
        ),
        ({"prompt_ids": [[1]], "chosen_ids": [[2]]}, "rejected_ids"),
        ({"prompt_ids": [[1], [2]], "chosen_ids": [[2]], "rejected_ids": [[3], [4]]}, "differ in length"),
        (
            {"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": [[3]], "ref_chosen_logps": [0.5]},
            "both",
        ),
        (
            {
                "prompt_ids": [[1]],
                "chosen_ids": [[2]],
                "rejected_ids": [[3]],
                "ref_chosen_logps": [0.5, 1.0],
                "ref_rejected_logps": [0.5, 1.0],
            },
            "one per pair",
        ),
        ({"prompt_ids": [[[1]]], "chosen_ids": [[2]], "rejected_ids": [[3]]}, "1-D"),
    ],
)
def test_bad_batches_raise(batch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        collate_pairs(batch, 0)


def test_bad_pad_to_multiple_of_raises() -> None:
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate_pairs(TWO_PAIRS, 0, pad_to_multiple_of=0)
