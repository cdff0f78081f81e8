"""Tests for dpo_cluster.logprobs: chunked log-probs against the naive log_softmax + gather reference."""

from __future__ import annotations

import pytest
import torch

from dpo_cluster.logprobs import (
    build_shifted_labels,
    compute_ld_sequence_logps,
    compute_mean_logits,
    compute_token_logps,
    compute_wpo_token_logps,
)

B, T, V = 3, 7, 50


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The textbook reference: full-vocabulary log_softmax, gather, mask."""
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(B, T, V, generator=generator)
    labels = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 0, 0],
        ]
    )
    return logits, labels, mask


def test_build_shifted_labels_literal() -> None:
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    labels, label_mask = build_shifted_labels(input_ids, completion_mask)
    assert labels.tolist() == [[6, 7, 8, 0, 0], [10, 11, 0, 0, 0]]
    assert label_mask.tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert labels.dtype == torch.long


def test_matches_naive_fp32(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, labels, mask = inputs
    expected = naive_token_logps(logits, labels, mask)
    token_logps = compute_token_logps(logits, labels, mask)
    assert token_logps.shape == (B, T) and token_logps.dtype == torch.float32
    torch.testing.assert_close(token_logps, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        compute_token_logps(logits, labels, mask).sum(dim=1), expected.sum(1), atol=1e-5, rtol=1e-6
    )


def test_bf16_logits_upcast_per_chunk(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, labels, mask = inputs
    logits_bf16 = logits.to(torch.bfloat16)
    logps = compute_token_logps(logits_bf16, labels, mask, chunk_rows=4).sum(dim=1)
    assert logps.dtype == torch.float32
    # Same values as fp32 math on the bf16-rounded logits ...
    exact = naive_token_logps(logits_bf16.float(), labels, mask).sum(1)
    torch.testing.assert_close(logps, exact, atol=1e-5, rtol=1e-6)
    # ... and within bf16 rounding of the fp32 logits' answer.
    torch.testing.assert_close(logps, naive_token_logps(logits, labels, mask).sum(1), atol=0.1, rtol=0.02)


def test_masked_positions_contribute_nothing(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, labels, mask = inputs
    base = compute_token_logps(logits, labels, mask).sum(dim=1)
    # Garbage (even non-finite logits and -100 labels) where mask == 0 changes nothing.
    masked = mask == 0
    garbage_logits = logits.clone()
    garbage_logits[masked] = float("nan")
    garbage_labels = labels.masked_fill(masked, -100)
    torch.testing.assert_close(compute_token_logps(garbage_logits, garbage_labels, mask).sum(dim=1), base)
    token_logps = compute_token_logps(garbage_logits, garbage_labels, mask)
    assert torch.all(token_logps[masked] == 0)
    # And masked positions receive exactly zero gradient.
    leaf = logits.clone().requires_grad_(True)
    compute_token_logps(leaf, labels, mask).sum(dim=1).sum().backward()
    assert torch.all(leaf.grad[masked] == 0)
    assert torch.any(leaf.grad[~masked] != 0)


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 21, 1000])
def test_chunk_size_independence(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk_rows: int
) -> None:
    logits, labels, mask = inputs
    reference = compute_token_logps(logits, labels, mask, chunk_rows=3)
    torch.testing.assert_close(compute_token_logps(logits, labels, mask, chunk_rows=chunk_rows), reference)
    leaf = logits.clone().requires_grad_(True)
    weights = torch.arange(1.0, B + 1)
    (compute_token_logps(leaf, labels, mask, chunk_rows=chunk_rows).sum(dim=1) * weights).sum().backward()
    leaf_ref = logits.clone().requires_grad_(True)
    (compute_token_logps(leaf_ref, labels, mask, chunk_rows=3).sum(dim=1) * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_naive(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> None:
    logits, labels, mask = inputs
    logits = logits.to(dtype)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(1))

    ours = logits.clone().requires_grad_(True)
    (compute_token_logps(ours, labels, mask, chunk_rows=4) * upstream).sum().backward()
    naive = logits.clone().float().requires_grad_(True)
    (naive_token_logps(naive, labels, mask) * upstream).sum().backward()

    assert ours.grad.dtype == dtype
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ours.grad.float(), naive.grad, **tolerance)


def test_gradcheck_double() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=generator)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    # The chunk is fp32 by design, so check the analytic gradient against fp64 finite differences loosely.
    assert torch.autograd.gradcheck(
        lambda x: compute_token_logps(x, labels, mask, chunk_rows=2).double(), (logits,), eps=1e-3, atol=1e-3
    )


def test_no_mask_scores_every_position(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, labels, _ = inputs
    torch.testing.assert_close(
        compute_token_logps(logits, labels), naive_token_logps(logits, labels, torch.ones(B, T))
    )


def test_shape_errors(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, labels, mask = inputs
    with pytest.raises(ValueError, match="labels must be"):
        compute_token_logps(logits, labels[:, :-1], mask).sum(dim=1)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        compute_token_logps(logits[0], labels, mask).sum(dim=1)
    with pytest.raises(ValueError, match="chunk_rows"):
        compute_token_logps(logits, labels, mask, chunk_rows=0).sum(dim=1)


def test_mean_logit_sums(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, _, mask = inputs
    expected = (logits.mean(-1) * mask).sum(1)
    torch.testing.assert_close(compute_mean_logits(logits, mask, chunk_rows=2).sum(dim=1), expected)


def test_wpo_token_logps(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Aligned token log-probs of WPO eq. 2: log p(y_t) - log sum_v p_v^2, 0 off the mask, no grad."""
    logits, labels, mask = inputs
    probs = torch.softmax(logits, dim=-1)
    expected = naive_token_logps(logits, labels, mask) - torch.log((probs**2).sum(-1)) * mask
    leaf = logits.clone().requires_grad_(True)
    got = compute_wpo_token_logps(leaf, labels, mask, chunk_rows=3)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


def test_ld_sequence_logps_literal() -> None:
    """Chosen has 3 completion tokens, rejected 1: l_p = 1, so chosen = 1 + a*(2 + 4), rejected = 8."""
    chosen_token_logps = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0]])
    chosen_mask = torch.tensor([[0, 1, 1, 1, 0]])
    rejected_token_logps = torch.tensor([[0.0, 0.0, 8.0, 0.0, 0.0]])
    rejected_mask = torch.tensor([[0, 0, 1, 0, 0]])
    chosen, rejected = compute_ld_sequence_logps(
        chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, alpha=0.5
    )
    assert chosen.tolist() == [1.0 + 0.5 * 6.0]
    assert rejected.tolist() == [8.0]
    full, _ = compute_ld_sequence_logps(
        chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, alpha=1.0
    )
    assert full.tolist() == [7.0]
    with pytest.raises(ValueError, match="alpha"):
        compute_ld_sequence_logps(
            chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, alpha=2.0
        )
