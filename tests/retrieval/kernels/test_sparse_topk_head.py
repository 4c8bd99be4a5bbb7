"""The dense head of the sparse top-k kernel: its layout, the exact split of the query weights,
the head matmul against float64, and the hybrid (head matmul + tail scatter) against the reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), at small sizes; the
interpreter's ``dot`` does not read bfloat16, so bfloat16 heads run on the GPU only.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.kernels import sparse_head
from retrieval.kernels import sparse_topk as st
from retrieval.kernels.inverted_index import InvertedIndex
from retrieval.kernels.sparse_topk import sparse_topk_reference, sparse_topk_triton
from tests.retrieval.kernels.test_sparse_topk import assert_same_up_to_ties, collection, queries

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])


def test_head_holds_the_most_frequent_terms_densely() -> None:
    docs = collection(300, 40, density=0.15, seed=21)
    docs[:, 39] = 0  # a term without postings never enters the head
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float16, block_bits=5)
    head = index.with_head(20)
    assert head.head.shape == (300, 32) and head.head.dtype == torch.float16  # 20 rounded up to 32
    df = (docs > 0).sum(0)
    terms = (head.head_slot >= 0).nonzero().squeeze(1)
    assert len(terms) == 20 and df[terms].min() >= df[head.head_slot < 0].max()
    assert torch.equal(head.head_slot[terms].sort().values, torch.arange(20))
    assert torch.equal(head.head[:, head.head_slot[terms]].float(), docs[:, terms].half().float())
    assert (head.head[:, 20:] == 0).all()
    assert head.nbytes == index.nbytes + 300 * 32 * 2 + 40 * 8
    everything = index.with_head(1000)  # capped at the 39 terms with postings
    assert int((everything.head_slot >= 0).sum()) == 39 and everything.head_slot[39] == -1
    assert index.with_head(0).head is None and head.with_head(0).head_slot is None
    moved = InvertedIndex.from_state(index.state(), "cpu", head_terms=20)
    assert torch.equal(moved.head, head.head) and torch.equal(moved.head_slot, head.head_slot)
    with pytest.raises(ValueError, match="head size"):
        index.with_head(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_split_queries_is_exact_to_float32_rounding(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(22)
    q = torch.rand(6, 48, generator=g) * torch.logspace(-3, 4, 6)[:, None]  # rows of any magnitude
    q[0] = 0  # an empty row
    q[1, :5] = torch.tensor([1e-30, 3e38, 0.0, 1.0, 2.0**-20])  # extremes
    pieces, scale = sparse_head.split_queries(q, dtype)
    assert pieces.shape == (sparse_head.PARTS[dtype], 6, 48) and pieces.dtype == dtype
    assert ((pieces[0] >= 0) & (pieces[0] <= 2)).all() and (pieces[1:].abs() <= 2.0**-8).all()
    assert torch.equal(scale.log2(), scale.log2().round())  # powers of two
    back = pieces.double().sum(0) * scale[:, None].double()
    rows_max = q.amax(1, keepdim=True).double()
    assert ((back - q.double()).abs() <= 2.0**-21 * rows_max).all()
    if dtype == torch.float32:
        return  # one piece, the weights themselves: float32 products round as the reference's do
    w = torch.rand(48, generator=g).to(dtype)  # document weights as stored: each product is exact
    assert torch.equal((pieces.float() * w.float()).double(), pieces.double() * w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "n_docs", "lo", "width"), [(1, 300, 0, 304), (20, 300, 128, 176), (130, 700, 256, 384)]
)
def test_head_matmul_is_the_float64_product(dtype, b, n_docs, lo, width) -> None:
    """Every column written (0 past the last document), scores within float32 rounding."""
    docs = collection(n_docs, 50, density=0.3, seed=b, device=DEVICE)
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), dtype, block_bits=6).with_head(37)  # H' = 48
    q = queries(b, 48, terms=30, seed=b + 1, device=DEVICE) * 7
    acc = torch.full((b, width), float("nan"), device=DEVICE)
    sparse_head.head_scores(index, sparse_head.split_queries(q, dtype), acc, lo)
    want = q.double() @ index.head[lo : lo + width].double().T  # (B, <= W)
    got = acc.double()
    assert (got[:, want.shape[1] :] == 0).all()
    torch.testing.assert_close(got[:, : want.shape[1]], want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_docs", "vocab", "head", "k", "budget", "integer"),
    [
        (500, 60, 16, 10, 1 << 20, False),  # one wave
        (500, 60, 20, 10, 4 * 20 * 64 * 3, False),  # several waves, a partial last one
        (500, 60, 60, 10, 4 * 20 * 64 * 3, False),  # every term in the head: no scatter at all
        (500, 60, 8, 10, 4 * 8 * 64, False),  # groups of 8 queries
        (300, 40, 12, 200, 1 << 20, False),  # k beyond the matching documents
        (400, 30, 10, 15, 4 * 20 * 128, True),  # duplicate scores everywhere
    ],
)
def test_hybrid_matches_the_reference(dtype, n_docs, vocab, head, k, budget, integer) -> None:
    docs = collection(n_docs, vocab, density=0.15, seed=23, integer=integer)
    q = queries(20, vocab, terms=6, seed=24, integer=integer)
    q[1] = 0
    q[1, vocab - 1] = 1.0  # only a rare (tail) term
    q[2] = 0
    q[2, :3] = 2.0  # only frequent (head) terms
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), dtype, block_bits=6)
    want = sparse_topk_reference(index, q.to_sparse_csr(), k, budget_bytes=budget)
    hybrid = index.with_head(head).to(DEVICE)
    got = sparse_topk_triton(
        hybrid, q.to(DEVICE).to_sparse_csr(), k, budget_bytes=budget, select_block=16, use_head=True
    )
    got = tuple(t.cpu() for t in got)
    assert_same_up_to_ties(got, want, q, docs.to(dtype).float(), rtol=1e-5, atol=1e-5)
    assert (got[1][0] == -1).all()  # the empty query


def test_the_head_is_used_where_it_reads_fewer_bytes(monkeypatch) -> None:
    docs = collection(200, 30, density=0.3, seed=25)
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), torch.float32, block_bits=6).with_head(16)
    head_bytes = 200 * 16 * 4
    q = queries(64, 30, terms=5, seed=26)
    terms = q.to_sparse_csr().col_indices()
    in_head = index.head_slot[terms] >= 0
    head_postings = int(index.indptr.diff()[terms][in_head].sum()) * 8  # int32 id + float32 weight
    assert head_postings > head_bytes and sparse_head.head_pays_off(index, terms, margin_bytes=0)
    assert not sparse_head.head_pays_off(index, terms[:3], margin_bytes=0)  # a query's worth
    assert not sparse_head.head_pays_off(index, terms)  # by the default margin, 2 GiB
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: pytest.fail("host sync"))
    assert not sparse_head.head_pays_off(index, terms)  # bounded on the host: ~320 pairs x 200 docs x 8 bytes
    monkeypatch.undo()
    calls = []
    # patched where score_wave looks it up (retrieval.kernels.sparse_topk), or it would test nothing
    monkeypatch.setattr(st, "head_scores", lambda *a: calls.append(a[3]) or pytest.fail("head used"))
    for rows, use_head in ((slice(0, 1), None), (slice(0, 64), False)):
        got = sparse_topk_triton(index.to(DEVICE), q[rows].to(DEVICE), 5, select_block=16, use_head=use_head)
        want = sparse_topk_reference(index, q[rows], 5)
        assert_same_up_to_ties(tuple(t.cpu() for t in got), want, q[rows], docs)
    assert not calls


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_docs", "vocab", "n_queries", "terms", "head", "k"),
    [
        (50_000, 30_522, 32, 7, 128, 100),
        (100_000, 8_000, 256, 40, 256, 1000),
        (200_000, 2_000, 1000, 40, 64, 10),
    ],
)
def test_hybrid_on_gpu_matches_the_reference(dtype, n_docs, vocab, n_queries, terms, head, k) -> None:
    docs = collection(n_docs, vocab, density=40 / vocab * 3, seed=n_docs, device="cuda")
    q = queries(n_queries, vocab, terms, seed=k, device="cuda")
    index = InvertedIndex.from_csr(docs.to_sparse_csr(), dtype).to("cuda")
    want = sparse_topk_reference(index, q.to_sparse_csr(), k)
    got = sparse_topk_triton(index.with_head(head), q.to_sparse_csr(), k, budget_bytes=1 << 27, use_head=True)
    assert_same_up_to_ties(got, want, q, docs.to(dtype).float(), rtol=1e-4, atol=1e-4)
