"""The fused linear head (dpo_cluster.batch.fused_head) against numerical gradients and against
autograd through the head module, and the tied embedding's sparse lookup gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dpo_cluster.batch import fused_head
from dpo_cluster.batch.collate import collate_pairs
from dpo_cluster.batch.fused_head import FusedHeadLogps, allow_grad_in_place
from dpo_cluster.batch.hidden_logps import (
    OutputHead,
    find_output_head,
    forward_hidden,
    head_row_values,
)
from dpo_cluster.batch.logps import compute_sequence_scores
from dpo_cluster.batch.packing import pack_pairs
from dpo_cluster.logprobs import compute_mean_logits, compute_token_logps, compute_wpo_token_logps
from tests.test_hidden_logps import PAIRS, _assert_same, _grads

ROWS, HIDDEN, VOCAB = 7, 5, 11
TILINGS = {
    "one-tile": (fused_head.BLOCK_ELEMENTS, fused_head.MIN_TILE),
    "tiles-of-2": (6, 2),
    "tiles-of-4": (8, 4),
}


@pytest.fixture(params=list(TILINGS))
def tiling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The vocabulary in one tile (as at these sizes by default) or in several narrow ones."""
    block, min_tile = TILINGS[request.param]
    monkeypatch.setattr(fused_head, "BLOCK_ELEMENTS", block)
    monkeypatch.setattr(fused_head, "MIN_TILE", min_tile)
    return request.param


def _inputs(dtype: torch.dtype, bias: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=dtype, requires_grad=True)
    bias_ = torch.randn(VOCAB, generator=generator, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    return hidden, weight, bias_, labels


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize(
    ("bias", "scale", "softcap"),
    [(False, None, None), (True, 0.5, None), (True, None, 2.0), (False, 1.5, 3.0)],
)
def test_gradients_equal_numerical_ones(
    chunk_size: int, bias: bool, scale: float | None, softcap: float | None, tiling: str
) -> None:
    hidden, weight, bias_, labels = _inputs(torch.float64, bias)

    def logps(hidden: torch.Tensor, weight: torch.Tensor, bias_: torch.Tensor | None) -> torch.Tensor:
        return FusedHeadLogps.apply(hidden, weight, bias_, labels, chunk_size, scale, softcap, False)[0]

    assert torch.autograd.gradcheck(logps, (hidden, weight, bias_))


def _module_head(weight: torch.Tensor, bias: torch.Tensor | None, **post: float | None) -> OutputHead:
    """The same head as a module, scored by the checkpointed path (not fused: a subclass)."""

    class Head(torch.nn.Linear):
        pass

    linear = Head(HIDDEN, VOCAB, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return OutputHead(torch.nn.Identity(), linear, post.get("scale"), post.get("softcap"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_values_and_gradients_equal_autograd_through_the_module(
    dtype: torch.dtype, softcap: float | None, tiling: str
) -> None:
    hidden, weight, bias, labels = _inputs(dtype, bias=True, seed=1)
    fused = OutputHead(torch.nn.Identity(), torch.nn.Linear(HIDDEN, VOCAB, dtype=dtype), 0.7, softcap)
    with torch.no_grad():
        fused.head.weight.copy_(weight)
        fused.head.bias.copy_(bias)
    module = _module_head(weight, bias, scale=0.7, softcap=softcap)
    assert fused.fused and not module.fused
    upstream = torch.linspace(-1.0, 2.0, ROWS)
    results = []
    for head in (fused, module):
        rows = hidden.detach().clone().requires_grad_()
        values = head_row_values(head, rows, labels, chunk_size=3, with_wpo=True)
        (values.logps * upstream).sum().backward()
        grads = [rows.grad, head.head.weight.grad, head.head.bias.grad]
        results.append(([values.logps, values.mean_logits, values.wpo_logps], grads))
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for got, want in zip(*results):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance)


def test_mean_logits_and_wpo_values_equal_the_full_logits_functions(tiling: str) -> None:
    hidden, weight, _, labels = _inputs(torch.float32, bias=False, seed=2)
    logps, mean_logits, wpo = FusedHeadLogps.apply(hidden, weight, None, labels, 2, None, None, True)
    logits = (hidden @ weight.t()).unsqueeze(0)  # one sequence of ROWS positions
    mask = torch.ones(1, ROWS, dtype=torch.bool)
    torch.testing.assert_close(logps, compute_token_logps(logits, labels.unsqueeze(0), mask)[0])
    torch.testing.assert_close(mean_logits, compute_mean_logits(logits, mask)[0])
    torch.testing.assert_close(wpo, compute_wpo_token_logps(logits, labels.unsqueeze(0), mask)[0])
    assert not mean_logits.requires_grad and not wpo.requires_grad and logps.requires_grad


def test_in_place_accumulation_adds_the_head_share_once(tiling: str) -> None:
    hidden, weight, _, labels = _inputs(torch.float32, bias=False, seed=4)
    upstream = torch.linspace(-1.0, 1.0, ROWS)

    def head_grad(in_place: bool, earlier: torch.Tensor | None) -> torch.Tensor:
        w = weight.detach().clone().requires_grad_()
        if in_place:
            allow_grad_in_place(w)
        w.grad = None if earlier is None else earlier.clone()
        before = w.grad
        (FusedHeadLogps.apply(hidden, w, None, labels, 3, None, None, False)[0] * upstream).sum().backward()
        if in_place and earlier is not None:
            assert w.grad is before  # written where it was, not replaced
        return w.grad

    earlier = torch.randn(VOCAB, HIDDEN)
    share = head_grad(False, None)
    torch.testing.assert_close(head_grad(True, None), share)  # no .grad yet: autograd's way
    torch.testing.assert_close(head_grad(True, earlier), earlier + share)
    torch.testing.assert_close(head_grad(False, earlier), earlier + share)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do() -> None:
    hidden, weight, _, labels = _inputs(torch.float32, bias=False, seed=3)
    weight.requires_grad_(False)
    logps = FusedHeadLogps.apply(hidden, weight, None, labels, 4, None, None, False)[0]
    logps.sum().backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


def _tiny(base_dir: Path, in_place: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if in_place:
        allow_grad_in_place(find_output_head(model).head.weight)
    return model


def test_the_tied_lookup_is_sparse_only_where_the_head_adds_in_place(base_dir: Path) -> None:
    lookups: list[torch.Tensor] = []
    for in_place in (False, True):
        model = _tiny(base_dir, in_place)
        head = find_output_head(model)
        embedding = model.get_input_embeddings()
        assert head.fused and head.tied_embedding is embedding
        handle = embedding.register_forward_hook(lambda _m, _a, out: lookups.append(out))
        try:
            for rows in ([1, 2], []):  # scored positions, or none: the head still makes .grad
                model.zero_grad(set_to_none=True)
                ids = torch.tensor([[3, 4, 5, 6]])
                states = forward_hidden(model, head, {"input_ids": ids})[0]
                values = head_row_values(head, states[rows], ids[0, 1:3][: len(rows)], chunk_size=1)
                assert lookups.pop().grad_fn._saved_sparse is in_place
                assert embedding.sparse is False  # set for the forward only
                (values.logps.sum() + states.sum()).backward()
                grad = embedding.weight.grad
                assert grad.layout == torch.strided and (grad[ids[0]].abs().sum(dim=1) > 0).all()
            with torch.no_grad():
                forward_hidden(model, head, {"input_ids": ids})
            assert lookups.pop().grad_fn is None and embedding.sparse is False
        finally:
            handle.remove()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_in_place_accumulation_over_micro_batches_equals_the_full_logits_path(
    base_dir: Path, layout: str, tiling: str
) -> None:
    """Two accumulated backward passes, the second into existing gradients, as a step of two
    micro-batches: every gradient equals the full-logits path's."""
    batch = (collate_pairs if layout == "padded" else pack_pairs)(PAIRS, 1)
    results = []
    for chunk_size, in_place in ((0, False), (3, True)):
        model = _tiny(base_dir, in_place)
        for weight in (1.0, -0.5):
            scores = compute_sequence_scores(model, batch, chunk_size=chunk_size, wpo_weights=True)
            (scores.logps * torch.linspace(-1.0, 1.0, scores.logps.shape[0]) * weight).sum().backward()
        results.append(_grads(model))
    _assert_same(results[1], results[0])


def test_an_adapted_head_uses_the_module_path(base_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head"]))
    head = find_output_head(model)
    assert not head.fused
