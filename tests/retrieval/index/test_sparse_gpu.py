"""The sparse_gpu index: same runs as sparse_torch on real splade-tiny vectors, atomic build, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retrieval.index.manifest import IndexFormatError, partial_dir
from retrieval.index.sparse_gpu import POSTINGS, SparseGpuSearcher, build_sparse_gpu
from retrieval.index.sparse_torch import SparseTorchSearcher
from tests.retrieval.index.test_sparse_torch import scifact, subset  # noqa: F401  (fixtures)


def build(doc_ids, vectors, out: Path, corpus: Path, **kwargs):
    return build_sparse_gpu(
        doc_ids,
        vectors,
        out,
        encoder="enc",
        encoder_checksum="abc",
        tokenizer="tok",
        corpus_path=corpus,
        **kwargs,
    )


@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
@pytest.mark.parametrize("queries", ["splade_queries", "idf_queries"])
def test_same_run_as_sparse_torch(subset: dict, tmp_path: Path, weight_dtype: str, queries: str) -> None:  # noqa: F811
    torch_run = SparseTorchSearcher(subset["index"]).search(subset["query_ids"], subset[queries], k=20)
    doc_ids = SparseTorchSearcher(subset["index"]).doc_ids
    corpus = Path(subset["manifest"].corpus)
    manifest = build(doc_ids, subset["docs"], tmp_path / "gpu", corpus, weight_dtype=weight_dtype)
    assert manifest.extra["nnz"] == subset["docs"].values().numel()
    gpu = SparseGpuSearcher(tmp_path / "gpu", device="cpu", budget_bytes=4 * 50 * 64)  # several waves
    run = gpu.search(subset["query_ids"], subset[queries], k=20, batch_size=16)
    tol = 1e-5 if weight_dtype == "float32" else 2e-3  # float16 postings: relative rounding 2^-11
    for qid in subset["query_ids"]:
        got, want = run.ranked(qid), torch_run.ranked(qid)
        assert len(got) == len(want)
        torch.testing.assert_close(
            torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]), rtol=tol, atol=tol
        )
        if weight_dtype == "float32":
            assert [d for d, _ in got] == [d for d, _ in want]


def test_build_is_atomic_and_refuses_bad_input(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "d0", "text": "x"}\n')
    vectors = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, 0.5]]).to_sparse_csr()
    with pytest.raises(ValueError, match="weight_dtype"):
        build(["a", "b"], vectors, tmp_path / "x", corpus, weight_dtype="int8")
    with pytest.raises(ValueError, match=">= 0"):
        build(
            ["a", "b"], torch.tensor([[0.0, -1.0, 0.0], [1.0, 0, 0]]).to_sparse_csr(), tmp_path / "y", corpus
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    build(["a", "b"], vectors, tmp_path / "ok", corpus)
    assert not partial_dir(tmp_path / "ok").exists()
    run = SparseGpuSearcher(tmp_path / "ok", device="cpu").search(["q"], torch.tensor([[1.0, 0.0, 2.0]]), k=5)
    assert run.ranked("q") == [("b", 3.0)]  # 1 * 2.0 + 2 * 0.5; "a" shares no term
    (tmp_path / "ok" / POSTINGS).write_bytes(b"not a tensor file")
    with pytest.raises(IndexFormatError, match="unreadable"):
        SparseGpuSearcher(tmp_path / "ok", device="cpu")
    (tmp_path / "ok" / "doc_ids.json").write_text(json.dumps(["a"]))
    with pytest.raises(IndexFormatError):
        SparseGpuSearcher(tmp_path / "ok", device="cpu")
