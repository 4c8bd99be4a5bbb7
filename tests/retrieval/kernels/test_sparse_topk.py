"""Exact sparse top-k: the torch reference against brute force, the Triton kernel against the reference.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), at small sizes.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.eval.topk import topk_with_id_ties
from retrieval.kernels import sparse_select
from retrieval.kernels import sparse_topk as st
from retrieval.kernels.inverted_index import InvertedIndex
from retrieval.kernels.sparse_single import SingleQuerySearch
from retrieval.kernels.sparse_topk import sparse_topk, sparse_topk_reference, sparse_topk_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # without CUDA the kernels run in the interpreter


def collection(
    n_docs: int, vocab: int, density: float, seed: int, integer: bool = False, device: str = "cpu"
) -> torch.Tensor:
    """(N, V) dense non-negative document weights with a Zipf-like term skew; integer ones tie a lot."""
    g = torch.Generator(device).manual_seed(seed)
    skew = 1.0 / torch.arange(1, vocab + 1, device=device) ** 0.8  # (V,) common terms first
    p = (density * vocab * skew / skew.sum()).clamp(max=1.0)
    active = torch.rand(n_docs, vocab, generator=g, device=device) < p
    w = (
        torch.randint(1, 4, (n_docs, vocab), generator=g, device=device).float()
        if integer
        else torch.rand(n_docs, vocab, generator=g, device=device)
    )
    return active * w


def queries(
    n: int, vocab: int, terms: int, seed: int, integer: bool = False, device: str = "cpu"
) -> torch.Tensor:
    """(n, V) dense query weights with about ``terms`` non-zeros; row 0 is empty."""
    g = torch.Generator(device).manual_seed(seed)
    active = torch.rand(n, vocab, generator=g, device=device) < terms / vocab
    w = (
        torch.randint(1, 3, (n, vocab), generator=g, device=device).float()
        if integer
        else torch.rand(n, vocab, generator=g, device=device) * 3
    )
    q = active * w
    q[0] = 0
    return q


def brute_force(q: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = q.double() @ docs.double().T  # (B, N) exact enough to order float32 sums
    scores = scores.float()
    return topk_with_id_ties(scores.masked_fill(scores == 0, float("-inf")), k)


def assert_same_up_to_ties(got, want, q, docs, rtol=1e-5, atol=1e-5) -> None:
    """Same scores rank by rank; same documents above the k-th score; every returned score is its doc's."""
    (gs, gd), (ws, wd) = got, want
    assert gs.shape == ws.shape == gd.shape == wd.shape
    torch.testing.assert_close(gs, ws, rtol=rtol, atol=atol)
    assert torch.equal(gd < 0, wd < 0)
    true = q.double() @ docs.double().T  # (B, N)
    for row in range(len(gs)):
        live = gd[row] >= 0
        torch.testing.assert_close(
            gs[row][live].double(), true[row, gd[row][live]], rtol=rtol, atol=atol, check_dtype=False
        )
        if live.any():
            kth = ws[row][live].min()
            margin = atol + rtol * abs(float(kth))
            above = set(wd[row][ws[row] > kth + margin].tolist())
            assert above <= set(gd[row].tolist())


@pytest.mark.parametrize("block_bits", [4, 6])
@pytest.mark.parametrize("budget", [4 * 2 * 16, 4 * 5 * 16, 1 << 20])  # query groups / waves / one wave
@pytest.mark.parametrize("k", [1, 7, 400])  # 400 > the documents sharing a term with most queries
@pytest.mark.parametrize("integer", [False, True])
def test_reference_is_brute_force(block_bits: int, budget: int, k: int, integer: bool) -> None:
    docs = collection(300, 80, density=0.05, seed=1, integer=integer)
    q = queries(5, 80, terms=4, seed=2, integer=integer)
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float32, block_bits=block_bits)
    got = sparse_topk_reference(index, q.to_sparse_csr(), k, budget_bytes=budget)
    want = brute_force(q, docs, k)
    assert torch.equal(got[1], want[1])  # exact, ties included: lower id first
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert (got[1][0] == -1).all()  # the empty query


def test_layout_and_block_pointers() -> None:
    docs = collection(200, 50, density=0.1, seed=3)
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float16, block_bits=5)
    assert index.doc_ids.dtype == torch.int32 and index.weights.dtype == torch.float16
    for term in range(50):
        ids = index.doc_ids[index.indptr[term] : index.indptr[term + 1]].long()
        assert torch.equal(ids, docs[:, term].nonzero().squeeze(1))
        for block in range(index.block_ptr.shape[1]):
            first = int((ids < block * 32).sum()) + int(index.indptr[term])
            assert int(index.block_ptr[term, block]) == min(first, int(index.indptr[term + 1]))


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (torch.tensor([[0.0, -1.0]]), ">= 0"),
        (torch.tensor([[float("nan"), 1.0]]), "finite"),
        (torch.tensor([[1e5, 1.0]]), "overflows"),
    ],
)
def test_bad_documents_are_refused(docs: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float16)


def _csr(cols: list[int], values: list[float], vocab: int) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.tensor([0, len(cols)]),
        torch.tensor(cols),
        torch.tensor(values),
        (1, vocab),
        check_invariants=False,
    )


@pytest.mark.parametrize(
    ("query", "k", "message"),
    [
        (_csr([1], [1.0], 10), 0, "k must be >= 1"),
        (_csr([3, 12], [1.0, 1.0], 10), 5, "term id 12 outside"),
        (_csr([1], [-0.5], 10), 5, "weight -0.5"),
        (_csr([1], [float("nan")], 10), 5, "weight nan"),
        (torch.zeros(1, 11), 5, "V=11"),
    ],
)
def test_bad_queries_are_refused_before_any_launch(query, k, message, monkeypatch) -> None:
    index = InvertedIndex.from_csr(
        collection(40, 10, 0.3, seed=4).to_sparse_csr(), torch.float32, block_bits=6
    )

    def no_launch():
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(st, "_kernels", no_launch)
    for search in (sparse_topk_triton, sparse_topk_reference):
        with pytest.raises(ValueError, match=message):
            search(index, query, k)


@pytest.mark.parametrize(
    ("n_docs", "vocab", "k", "budget", "integer"),
    [
        (500, 60, 10, 1 << 20, False),  # one wave
        (500, 60, 10, 4 * 6 * 64, False),  # several waves, a partial last one
        (500, 60, 10, 4 * 2 * 64, False),  # groups of 2 queries, one block per wave
        (300, 40, 200, 1 << 20, False),  # k beyond the matching documents
        (400, 30, 15, 4 * 6 * 128, True),  # duplicate scores everywhere
    ],
)
def test_triton_kernel_matches_the_reference(n_docs, vocab, k, budget, integer) -> None:
    docs = collection(n_docs, vocab, density=0.08, seed=5, integer=integer)
    q = queries(6, vocab, terms=4, seed=6, integer=integer)
    q[1, vocab - 1] = 1.0  # a term no document may use: keep one rare term in the batch
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float32, block_bits=6)
    want = sparse_topk_reference(index, q.to_sparse_csr(), k, budget_bytes=budget)
    got = sparse_topk_triton(
        index.to(DEVICE), q.to(DEVICE).to_sparse_csr(), k, budget_bytes=budget, select_block=16
    )
    got = tuple(t.cpu() for t in got)
    assert_same_up_to_ties(got, want, q, docs)
    assert (got[1][0] == -1).all() and (got[0][0] == float("-inf")).all()  # the empty query


def test_dispatch_uses_the_reference_on_cpu(monkeypatch) -> None:
    index = InvertedIndex.from_csr(
        collection(60, 20, 0.2, seed=7).to_sparse_csr(), torch.float32, block_bits=4
    )
    monkeypatch.setattr(st, "sparse_topk_triton", lambda *a, **kw: pytest.fail("kernel on a CPU index"))
    q = queries(3, 20, terms=3, seed=8)
    assert torch.equal(sparse_topk(index, q, 5)[1], brute_force(q, collection(60, 20, 0.2, seed=7), 5)[1])


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_docs", "vocab", "n_queries", "terms", "k"),
    [
        (5_000, 2_000, 1, 7, 10),
        (50_000, 30_522, 32, 7, 100),
        (100_000, 8_000, 256, 40, 1000),
        (3_000, 500, 8, 5, 5000),
    ],
)
def test_kernel_on_gpu_matches_the_reference(dtype, n_docs, vocab, n_queries, terms, k) -> None:
    docs = collection(n_docs, vocab, density=40 / vocab * 3, seed=n_docs, device="cuda")
    q = queries(n_queries, vocab, terms, seed=k, device="cuda")
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), dtype).to("cuda")
    want = sparse_topk_reference(index, q.to_sparse_csr(), k)
    got = sparse_topk_triton(index, q.to_sparse_csr(), k, budget_bytes=1 << 26)  # several waves
    # the index holds rounded weights: compare against the documents as stored
    stored = docs.to(dtype).float()
    assert_same_up_to_ties(got, want, q, stored, rtol=1e-4, atol=1e-4)


def test_packed_keys_order_by_score_then_id_and_drop_zeros() -> None:
    scores = torch.tensor([[0.5, 2.0, 0.5, 0.0, 1e-30, 3.4e38]])
    docs = torch.tensor([[7, 3, 2, 9, (1 << 32) - 1, 0]])
    keys = sparse_select.pack_keys(scores, docs)
    got_scores, got_docs = sparse_select.unpack_keys(keys.sort(dim=1, descending=True).values, 8)
    assert got_docs.tolist() == [[0, 3, 2, 7, (1 << 32) - 1, -1, -1, -1]]
    assert got_scores[0, :5].tolist() == [scores[0, 5].item(), 2.0, 0.5, 0.5, scores[0, 4].item()]
    assert (got_scores[0, 5:] == float("-inf")).all()


@pytest.mark.parametrize("run", [4, 16])
def test_run_maxima_kernel_is_the_run_maximum(run: int) -> None:
    acc = torch.rand(3, run * 50, generator=torch.Generator().manual_seed(run))
    acc[1] = 0
    got = sparse_select.run_maxima(acc.to(DEVICE), run).cpu()
    assert torch.equal(got, acc.view(3, -1, run).amax(2))


def test_single_query_mode_matches_the_reference_for_any_query_length() -> None:
    """Capacities are reused (a short query after a long one: stale padding must add nothing),
    an empty query finds nothing, and a query past ``max_terms`` takes the batched path."""
    vocab = 120
    docs = collection(700, vocab, density=0.1, seed=11)
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float32, block_bits=6)
    search = SingleQuerySearch(index.to(DEVICE), k=15, select_block=16, max_terms=32)
    g = torch.Generator().manual_seed(12)
    for n_terms in (20, 3, 0, 17, 60):
        q = torch.zeros(1, vocab)
        q[0, torch.randperm(vocab, generator=g)[:n_terms]] = torch.rand(n_terms, generator=g) + 0.1
        got = tuple(t.cpu() for t in search(q.to(DEVICE).to_sparse_csr()))
        assert_same_up_to_ties(got, sparse_topk_reference(index, q.to_sparse_csr(), 15), q, docs)
    assert sorted(search._graphs) == [16, 32]
    with pytest.raises(ValueError, match="one query"):
        search(torch.ones(2, vocab))
