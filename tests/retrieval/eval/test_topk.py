import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.eval.topk import full_sort_topk, topk_with_id_ties
from retrieval.types import ItemSets

NEG_INF = float("-inf")


def _reference(scores, k, exclude=None):
    """Python-loop ranking: candidates = finite, non-excluded items; (score desc, id asc); pad -1."""
    out_items, out_scores = [], []
    for u, row in enumerate(scores.float().tolist()):
        banned = (
            set()
            if exclude is None
            else set(exclude.indices[exclude.indptr[u] : exclude.indptr[u + 1]].tolist())
        )
        cand = [(-s, i) for i, s in enumerate(row) if i not in banned and s != NEG_INF]
        top = sorted(cand)[:k]
        out_items.append([i for _, i in top] + [-1] * (k - len(top)))
        out_scores.append([-s for s, _ in top] + [NEG_INF] * (k - len(top)))
    return torch.tensor(out_scores, dtype=torch.float32), torch.tensor(out_items, dtype=torch.int64)


def _random_sets(U, N, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    return ItemSets.from_pairs(
        torch.randint(0, U, (nnz,), generator=g), torch.randint(0, N, (nnz,), generator=g), U, N
    )


def test_ties_break_by_item_id_at_and_inside_the_cut():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 3.0, 1.0, 1.0]])
    vals, idx = topk_with_id_ties(s, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [0, 2]]
    assert vals.tolist() == [[2.0, 2.0], [0.0, 0.0], [3.0, 3.0]]
    _, idx = topk_with_id_ties(s, 4)
    assert idx.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3], [0, 2, 1, 3]]


def test_short_rows_are_padded_and_minus_inf_is_never_returned():
    s = torch.tensor([[5.0, NEG_INF, 1.0, NEG_INF], [NEG_INF] * 4])
    vals, idx = topk_with_id_ties(s, 3)
    assert idx.tolist() == [[0, 2, -1], [-1, -1, -1]]
    assert vals[0, :2].tolist() == [5.0, 1.0] and torch.isinf(vals[:, 2]).all()
    vals, idx = topk_with_id_ties(s, 6)  # k larger than the catalogue
    assert idx.shape == (2, 6) and idx[0].tolist() == [0, 2, -1, -1, -1, -1]


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        topk_with_id_ties(torch.tensor([[0.0, float("nan"), 1.0]]), 1)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.lists(
                st.lists(
                    st.sampled_from([0.0, 1.0, 2.0, 2.5, NEG_INF, float("inf")]), min_size=n, max_size=n
                ),
                min_size=1,
                max_size=5,
            ),
            st.integers(1, 8),
        )
    )
)
def test_topk_with_id_ties_matches_reference(args):
    rows, k = args
    s = torch.tensor(rows, dtype=torch.float32)
    vals, idx = topk_with_id_ties(s.clone(), k)
    ref_vals, ref_idx = _reference(s, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals, ref_vals)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 5, 30])
@pytest.mark.parametrize("levels", [3, 1000])  # few score levels = many ties
def test_full_sort_topk_matches_reference(chunk_size, k, levels):
    U, N = 40, 25
    g = torch.Generator().manual_seed(levels + k)
    table = torch.randint(0, levels, (U, N), generator=g).float()  # (U, N)
    exclude = _random_sets(U, N, 300, seed=k)
    users = torch.randperm(U, generator=g)[:30]
    vals, idx = full_sort_topk(lambda u: table[u], users, k, exclude=exclude, chunk_size=chunk_size)
    ref_vals, ref_idx = _reference(table[users], k, _subset(exclude, users))
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals, ref_vals)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (30, k)


def _subset(sets, users):
    row, item = sets.rows(users)
    return ItemSets.from_pairs(row, item, users.numel(), sets.num_items)


def test_excluded_item_that_scores_highest_is_never_returned():
    U, N = 5, 6
    table = torch.arange(N, dtype=torch.float32).expand(U, N).clone()  # item 5 always best
    exclude = ItemSets.from_pairs(torch.arange(U), torch.full((U,), N - 1), U, N)
    _, idx = full_sort_topk(lambda u: table[u], torch.arange(U), N, exclude=exclude)
    assert (idx[:, 0] == 4).all() and (idx != 5).all() and (idx[:, -1] == -1).all()


def test_score_fn_views_are_not_written_through():
    U, N = 4, 5
    cache = torch.rand(U, N)
    before = cache.clone()
    exclude = _random_sets(U, N, 10, seed=0)
    full_sort_topk(
        lambda u: cache[int(u[0]) : int(u[-1]) + 1], torch.arange(U), 2, exclude=exclude, chunk_size=2
    )
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_are_compared_as_float32(dtype):
    table = torch.tensor([[1.0, 3.0, 2.0, 3.0]], dtype=dtype)
    vals, idx = full_sort_topk(lambda u: table[u], torch.tensor([0]), 3)
    assert idx.tolist() == [[1, 3, 2]] and vals.dtype == torch.float32


def test_empty_users_and_bad_arguments():
    table = torch.rand(3, 4)
    vals, idx = full_sort_topk(lambda u: table[u], torch.zeros(0, dtype=torch.int64), 2)
    assert vals.shape == (0, 2) and idx.shape == (0, 2)
    with pytest.raises(ValueError, match="k must be"):
        full_sort_topk(lambda u: table[u], torch.arange(3), 0)
    with pytest.raises(ValueError, match="score_fn must return"):
        full_sort_topk(lambda u: table, torch.arange(2), 1)
    with pytest.raises(ValueError, match="exclude has"):
        full_sort_topk(lambda u: table[u], torch.arange(3), 1, exclude=ItemSets.empty(3, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    U, N, d = 300, 2000, 16
    g = torch.Generator().manual_seed(0)
    # small integer embeddings: dot products are exact on both devices, and ties are plentiful
    ue = torch.randint(-3, 4, (U, d), generator=g).float()
    ie = torch.randint(-3, 4, (N, d), generator=g).float()
    exclude = _random_sets(U, N, 5000, seed=1)
    cpu = full_sort_topk(lambda u: ue[u] @ ie.T, torch.arange(U), 50, exclude=exclude, chunk_size=64)
    ue_c, ie_c = ue.cuda(), ie.cuda()
    gpu = full_sort_topk(
        lambda u: ue_c[u] @ ie_c.T, torch.arange(U), 50, exclude=exclude, chunk_size=64, device="cuda"
    )
    assert torch.equal(cpu[1], gpu[1])


def test_nan_in_a_later_chunk_raises():
    table = torch.rand(6, 5)
    table[5, 2] = float("nan")  # only the last chunk has it: the check runs once, after the loop
    with pytest.raises(ValueError, match="NaN"):
        full_sort_topk(lambda u: table[u], torch.arange(6), 2, exclude=_random_sets(6, 5, 8, 0), chunk_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exclude_on", ["cpu", "cuda"])
def test_cuda_results_can_stay_on_the_device(exclude_on):
    U, N, d = 300, 2000, 16
    g = torch.Generator().manual_seed(0)
    ue = torch.randint(-3, 4, (U, d), generator=g).float()  # exact dot products, many ties
    ie = torch.randint(-3, 4, (N, d), generator=g).float()
    exclude = _random_sets(U, N, 5000, seed=1)
    cpu = full_sort_topk(lambda u: ue[u] @ ie.T, torch.arange(U), 50, exclude=exclude, chunk_size=64)
    ue_c, ie_c = ue.cuda(), ie.cuda()
    gpu = full_sort_topk(
        lambda u: ue_c[u] @ ie_c.T,
        torch.arange(U),
        50,
        exclude=exclude.to(exclude_on),
        chunk_size=64,
        device="cuda",
        out_device=None,
    )
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
