"""Fused dense top-k: the torch reference against brute force, the Triton kernel against the reference.

Brute force = the whole (B, N) float32 score matrix, excluded pairs set to -inf, then
:func:`retrieval.eval.topk.topk_with_id_ties` (score desc, item id asc). The Triton kernel runs
in Triton's interpreter on the CPU (small sizes: it is slow) and natively on CUDA when present.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.eval.topk import topk_with_id_ties
from retrieval.kernels.dense_topk import (
    MAX_TRITON_K,
    dense_topk,
    dense_topk_reference,
    dense_topk_triton,
)
from retrieval.types import ItemSets

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

DEVICE = "cuda" if CUDA else "cpu"  # without CUDA the kernel runs in the interpreter


def on_cpu(result: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.cpu() for t in result)


def make_inputs(
    n_users: int, n_items: int, dim: int, ties: bool, seed: int, excl_per_user: int = 3
) -> tuple[torch.Tensor, torch.Tensor, ItemSets]:
    """Random embeddings and exclusion sets; ``ties``: small integers, so equal scores are exact."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        q = torch.randint(-1, 2, (n_users, dim), generator=g).float()  # (B, d)
        e = torch.randint(-1, 2, (n_items, dim), generator=g).float()  # (N, d)
    else:
        q, e = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    pairs = n_users * excl_per_user
    users = torch.randint(0, n_users, (pairs,), generator=g)
    items = torch.randint(0, n_items, (pairs,), generator=g)
    return q, e, ItemSets.from_pairs(users, items, n_users, n_items)


def brute_force(
    q: torch.Tensor, e: torch.Tensor, k: int, exclude: ItemSets | None, users: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) scores and ids from the whole float32 score matrix."""
    scores = q.float() @ e.float().T  # (B, N)
    if exclude is not None:
        users = torch.arange(q.shape[0]) if users is None else users
        row, item = exclude.rows(users)
        scores[row, item] = float("-inf")
    return topk_with_id_ties(scores, k)


def assert_same_topk(got, want, q, e, atol: float = 0.0) -> None:
    """Identical lists when ``atol == 0``; else the same scores within ``atol`` (ids may swap in near-ties).

    With a tolerance, every returned id must be a real candidate whose own float32 score matches
    the score at its rank.
    """
    (gv, gi), (wv, wi) = got, want
    assert gv.shape == wv.shape and gi.shape == wi.shape and gi.dtype == torch.int64
    assert torch.equal(gv == float("-inf"), wv == float("-inf"))
    assert torch.equal(gi == -1, wi == -1)
    if atol == 0.0:
        assert torch.equal(gi, wi)
        assert torch.equal(gv, wv)
        return
    torch.testing.assert_close(gv, wv, atol=atol, rtol=0)
    valid = gi >= 0
    rescored = (q.float().unsqueeze(1) * e.float()[gi.clamp(min=0)]).sum(-1)  # (B, k)
    torch.testing.assert_close(rescored[valid], wv[valid], atol=atol, rtol=0)
    for row in gi:
        ids = row[row >= 0]
        assert ids.unique().numel() == ids.numel()
    mismatch = (gi != wi).float().mean().item()
    assert mismatch < 0.05, f"{mismatch:.1%} of the ids differ: more than near-ties explain"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("n_users", "n_items", "k", "item_chunk", "query_chunk"),
    [
        (13, 50, 5, 7, 4),  # many item chunks, ragged ends
        (20, 64, 64, 16, 1024),  # k = N: every candidate, tail padded by the excluded items
        (9, 10, 25, 3, 2),  # k > N
        (30, 200, 1, 1000, 8),  # k = 1, one item chunk
    ],
)
def test_reference_matches_brute_force(n_users, n_items, k, item_chunk, query_chunk, ties, seed):
    q, e, excl = make_inputs(n_users, n_items, 8, ties, seed)
    got = dense_topk_reference(q, e, k, excl, item_chunk=item_chunk, query_chunk=query_chunk)
    assert_same_topk(got, brute_force(q, e, k, excl), q, e, atol=0.0 if ties else 1e-5)


def test_reference_masks_and_pads():
    """A user whose every item is excluded gets only padding; another gets its exact list."""
    q = torch.tensor([[1.0], [1.0]])  # (2, 1)
    e = torch.tensor([[3.0], [1.0], [3.0], [-0.0]])  # (4, 1): items 0 and 2 tie, item 3 scores -0.0
    excl = ItemSets.from_pairs(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 1, 2, 3, 2]), 2, 4)
    vals, ids = dense_topk_reference(q, e, 4, excl)
    assert ids.tolist() == [[-1, -1, -1, -1], [0, 1, 3, -1]]
    assert vals[1, :3].tolist() == [3.0, 1.0, 0.0] and vals[0].eq(float("-inf")).all()


def test_reference_users_select_exclusion_rows():
    """``users`` maps queries to rows of ``exclude`` (a batch of users, in any order)."""
    q, e, excl = make_inputs(10, 40, 4, ties=False, seed=3, excl_per_user=10)
    users = torch.tensor([7, 2, 2, 9])
    got = dense_topk_reference(q[users], e, 6, excl, users=users, item_chunk=9)
    assert_same_topk(got, brute_force(q[users], e, 6, excl, users), q[users], e, atol=1e-5)


@pytest.mark.parametrize("bad_k", [0, -3, 2.5])
def test_bad_k_raises(bad_k):
    q, e, _ = make_inputs(2, 5, 4, ties=False, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        dense_topk(q, e, bad_k)
    with pytest.raises(ValueError, match="k must be"):
        dense_topk_triton(q, e, bad_k)


@pytest.mark.parametrize("which", ["queries", "items"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embeddings_raise(which, value):
    q, e, _ = make_inputs(3, 5, 4, ties=False, seed=0)
    (q if which == "queries" else e)[1, 2] = value
    for fn in (dense_topk, dense_topk_reference, dense_topk_triton):
        with pytest.raises(ValueError, match=f"{which} contain NaN"):
            fn(q, e, 2)


def test_mismatches_raise():
    q, e, excl = make_inputs(3, 5, 4, ties=False, seed=0)
    with pytest.raises(ValueError, match="dimensions differ"):
        dense_topk(q, e[:, :3], 2)
    with pytest.raises(ValueError, match="one dtype"):
        dense_topk(q, e.half(), 2)
    with pytest.raises(ValueError, match="one dtype"):
        dense_topk(q.double(), e.double(), 2)
    with pytest.raises(ValueError, match="pass users="):
        dense_topk(q[:2], e, 2, excl)
    with pytest.raises(ValueError, match="covers 5 items"):
        dense_topk(q, e[:4], 2, excl)
    with pytest.raises(ValueError, match="user ids must be in"):
        dense_topk(q, e, 2, excl, users=torch.tensor([0, 1, 3]))


def test_large_k_needs_the_reference():
    q, e, _ = make_inputs(2, 5, 4, ties=False, seed=0)
    with pytest.raises(ValueError, match="at most k="):
        dense_topk_triton(q, e, MAX_TRITON_K + 1)
    assert dense_topk(q, e, MAX_TRITON_K + 1)[1].shape == (2, MAX_TRITON_K + 1)


# Triton kernel, in the interpreter on CPU tensors (or natively on a GPU): small sizes only.


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("n_users", "n_items", "dim", "k", "splits"),
    [
        (19, 70, 8, 5, 1),  # one split, ragged query block and last tile
        (16, 96, 20, 7, 3),  # three splits merged by torch.topk, d not a power of two
        (5, 20, 4, 30, 2),  # k > N: padding
        (16, 40, 8, 1, 2),  # k = 1
    ],
)
def test_triton_matches_reference(n_users, n_items, dim, k, splits, ties):
    q, e, excl = make_inputs(n_users, n_items, dim, ties, seed=n_items, excl_per_user=4)
    q, e = q.to(DEVICE), e.to(DEVICE)
    got = dense_topk_triton(q, e, k, excl, block_q=16, block_n=32, splits=splits)
    want = dense_topk_reference(q, e, k, excl, item_chunk=17)
    assert_same_topk(
        tuple(x.cpu() for x in got), tuple(x.cpu() for x in want), q.cpu(), e.cpu(), 0.0 if ties else 1e-4
    )


def test_triton_dense_exclusions_and_no_exclusions():
    """Runs of excluded ids inside one tile, a fully excluded user, and ``exclude=None``."""
    q, e, _ = make_inputs(16, 64, 8, ties=True, seed=5)
    users = torch.cat([torch.zeros(64, dtype=torch.int64), torch.full((20,), 3), torch.tensor([7])])
    items = torch.cat([torch.arange(64), torch.arange(10, 30), torch.tensor([63])])
    excl = ItemSets.from_pairs(users, items, 16, 64)
    for exclude in (excl, None):
        got = on_cpu(
            dense_topk_triton(q.to(DEVICE), e.to(DEVICE), 6, exclude, block_q=16, block_n=32, splits=2)
        )
        assert_same_topk(got, brute_force(q, e, 6, exclude), q, e)
    assert dense_topk_triton(q.to(DEVICE), e.to(DEVICE), 6, excl, block_q=16, block_n=32)[1][0].eq(-1).all()


def test_triton_users_and_half_precision():
    """``users`` selects exclusion rows; float16 embeddings are multiplied exactly, summed in float32."""
    q, e, excl = make_inputs(12, 48, 16, ties=False, seed=9, excl_per_user=6)
    users = torch.tensor([11, 0, 5, 5, 3])
    q16, e16 = q[users].half(), e.half()
    got = on_cpu(
        dense_topk_triton(
            q16.to(DEVICE), e16.to(DEVICE), 4, excl, users=users.to(DEVICE), block_q=16, block_n=16
        )
    )
    want = dense_topk_reference(q16, e16, 4, excl, users=users)
    assert_same_topk(got, want, q16, e16, atol=1e-3)


# CUDA only: the native kernel against the reference on fresh random inputs, at several sizes.


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_users", "n_items", "dim", "k"),
    [(1000, 5000, 64, 20), (257, 40_981, 64, 100), (64, 300, 32, 512), (33, 50, 16, 100)],
)
def test_cuda_kernel_matches_reference(n_users, n_items, dim, k, dtype):
    q, e, excl = make_inputs(n_users, n_items, dim, ties=False, seed=k, excl_per_user=27)
    q, e = q.cuda().to(dtype), e.cuda().to(dtype)
    got = dense_topk(q, e, k, excl)
    want = dense_topk_reference(q, e, k, excl)
    atol = 1e-4 if dtype == torch.float32 else 2e-3
    assert_same_topk(tuple(x.cpu() for x in got), tuple(x.cpu() for x in want), q.cpu(), e.cpu(), atol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_exact_on_duplicate_scores(dtype):
    """Integer embeddings: every score is exact, so the lists must be identical, ties by id."""
    q, e, excl = make_inputs(500, 3000, 64, ties=True, seed=1, excl_per_user=27)
    q, e = q.cuda().to(dtype), e.cuda().to(dtype)
    for k in (1, 20, 100):
        got = dense_topk(q, e, k, excl)
        want = dense_topk_reference(q, e, k, excl)
        assert_same_topk(tuple(x.cpu() for x in got), tuple(x.cpu() for x in want), q.cpu(), e.cpu())
