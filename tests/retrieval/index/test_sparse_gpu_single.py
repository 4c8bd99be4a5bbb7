"""The sparse_gpu searcher's paths: one-query batches in single-query mode, others batched; the
dense head on a GPU. Random vectors only (no dataset), so these also run on the GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.index import sparse_gpu
from retrieval.index.sparse_gpu import SparseGpuSearcher, build_sparse_gpu
from retrieval.kernels.sparse_head import head_pays_off
from tests.retrieval.kernels.test_sparse_topk import collection, queries

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 ``sparse_gpu`` index of 400 random documents over 60 terms."""
    root = tmp_path_factory.mktemp("sparse-gpu")
    corpus = root / "corpus.jsonl"
    corpus.write_text('{"_id": "d0", "text": "x"}\n')
    docs = collection(400, 60, density=0.15, seed=31).to_sparse_csr()
    ids = [f"d{i}" for i in range(400)]
    kwargs = {"encoder": "enc", "encoder_checksum": "abc", "tokenizer": "tok", "corpus_path": corpus}
    build_sparse_gpu(ids, docs, root / "index", weight_dtype="float32", **kwargs)
    return root / "index"


def brute_force_run(q: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
    """Each query's top ``k`` (doc id, score) by score desc, id asc, documents sharing a term only."""
    scores = q.double() @ collection(400, 60, density=0.15, seed=31).double().T  # (B, N)
    out = []
    for row in scores:
        hits = [(float(s), i) for i, s in enumerate(row.tolist()) if s > 0]
        out.append([(f"d{i}", s) for s, i in sorted(hits, key=lambda h: (-h[0], h[1]))[:k]])
    return out


def assert_same_run(run, qids: list[str], want: list[list[tuple[str, float]]]) -> None:
    for qid, expected in zip(qids, want, strict=True):
        got = run.ranked(qid)
        assert [d for d, _ in got] == [d for d, _ in expected]
        torch.testing.assert_close(
            torch.tensor([s for _, s in got], dtype=torch.float64),
            torch.tensor([s for _, s in expected], dtype=torch.float64),
            rtol=1e-5,
            atol=1e-5,
        )


def test_one_query_batches_take_single_query_mode(index_dir: Path, monkeypatch) -> None:
    """batch_size 2 over 3 queries: one batch of two (batched path), one of one (single-query)."""
    calls: list[str] = []
    real_single, real_batched = sparse_gpu.SingleQuerySearch.__call__, sparse_gpu.sparse_topk
    monkeypatch.setattr(
        sparse_gpu.SingleQuerySearch, "__call__", lambda s, q: calls.append("single") or real_single(s, q)
    )
    monkeypatch.setattr(
        sparse_gpu, "sparse_topk", lambda *a: calls.append(f"batch of {a[1].shape[0]}") or real_batched(*a)
    )
    q = queries(3, 60, terms=5, seed=32)
    q[2, 5] = 1.0  # not empty
    qids = ["a", "b", "c"]
    searcher = SparseGpuSearcher(index_dir, device=DEVICE, single_query=True)  # off CUDA: the interpreter
    run = searcher.search(qids, q, k=7, batch_size=2)
    assert calls == ["batch of 2", "single"]
    assert_same_run(run, qids, brute_force_run(q, 7))
    searcher.search(qids[2:], q[2:], k=7)
    assert calls[2:] == ["single"] and list(searcher._single) == [7]  # one search kept per k
    calls.clear()
    default = SparseGpuSearcher(index_dir, device="cpu")  # off CUDA: batched, no head
    assert not default.single_query and default.index.head is None
    default.search(qids[2:], q[2:], k=7)
    assert calls == ["batch of 1"]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_on_gpu_single_queries_replay_graphs_and_batches_use_the_head(index_dir: Path) -> None:
    searcher = SparseGpuSearcher(index_dir, head_terms=16, use_head=True)
    assert searcher.single_query and searcher.index.head is not None
    q = queries(40, 60, terms=6, seed=33)
    q[0, 7] = 1.0
    qids = [f"q{i}" for i in range(40)]
    want = brute_force_run(q, 10)
    assert_same_run(searcher.search(qids[:1], q[:1], k=10), qids[:1], want[:1])  # a CUDA graph
    assert searcher._single[10]._graphs  # captured
    assert not head_pays_off(searcher.index, q.to_sparse_csr().col_indices().cuda())  # forced here
    assert_same_run(searcher.search(qids, q, k=10, batch_size=40), qids, want)
