"""The sparse_torch index: exact scores, tie-breaks, refusals, and quality on a SciFact subset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from retrieval.data.beir import BeirData, load_beir
from retrieval.encoders.inference_free import InferenceFreeQueryEncoder
from retrieval.encoders.splade import SpladeEncoder
from retrieval.eval.retrieval_evaluator import RetrievalEvaluator
from retrieval.index.manifest import MANIFEST, IndexFormatError, Manifest, partial_dir, write_manifest
from retrieval.index.sparse_torch import SparseTorchSearcher, build_sparse_torch
from retrieval.types import Qrels
from tests.retrieval.helpers import SPLADE_TINY, splade_tiny

NUM_QUERIES = 50  # test queries of the SciFact subset
NUM_DISTRACTORS = 150  # random unjudged documents added to the judged ones


def build(doc_ids: list[str], vectors: torch.Tensor, out: Path, corpus: Path, **kwargs) -> Manifest:
    return build_sparse_torch(
        doc_ids,
        vectors,
        out,
        encoder="enc",
        encoder_checksum="abc",
        tokenizer="tok",
        corpus_path=corpus,
        **kwargs,
    )


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "d0", "text": "x"}\n')
    return path


@pytest.fixture(scope="module")
def scifact(shared_data: Path) -> BeirData:
    return load_beir(str(shared_data / "scifact"))


@pytest.fixture(scope="module")
def subset(scifact: BeirData, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first 50 test queries, their judged documents plus 150 random others, indexed with splade-tiny."""
    queries = scifact.queries.head(NUM_QUERIES)
    qrels = Qrels({q: scifact.qrels[q] for q in queries["query_id"]})
    judged = {d for q in qrels for d in qrels[q]}
    others = sorted(set(scifact.corpus["doc_id"]) - judged)
    chosen = judged | set(random.Random(0).sample(others, NUM_DISTRACTORS))
    corpus = scifact.corpus.filter(scifact.corpus["doc_id"].is_in(list(chosen)))
    texts = [(t + " " + x).strip() for t, x in zip(corpus["title"], corpus["text"], strict=True)]
    encoder = SpladeEncoder(splade_tiny())
    docs = encoder.encode(texts)
    out = tmp_path_factory.mktemp("index") / "scifact-splade"
    manifest = build_sparse_torch(
        corpus["doc_id"].to_list(),
        docs,
        out,
        encoder=encoder.name,
        encoder_checksum=encoder.checksum,
        tokenizer=encoder.tokenizer_name,
        corpus_path=scifact.path / "corpus.jsonl",
    )
    query_texts = queries["text"].to_list()
    idf = InferenceFreeQueryEncoder.fit(SPLADE_TINY, texts)
    return {
        "index": out,
        "manifest": manifest,
        "docs": docs,
        "query_ids": queries["query_id"].to_list(),
        "splade_queries": encoder.encode(query_texts),
        "idf_queries": idf.encode(query_texts),
        "qrels": qrels,
    }


def test_scores_equal_a_dense_reference(subset: dict) -> None:
    searcher = SparseTorchSearcher(subset["index"])
    run = searcher.search(subset["query_ids"], subset["splade_queries"], k=20)
    reference = subset["splade_queries"].to_dense() @ subset["docs"].to_dense().T  # (Q, N)
    row = {d: i for i, d in enumerate(searcher.doc_ids)}
    for q, qid in enumerate(subset["query_ids"]):
        ranked = run.ranked(qid)
        assert len(ranked) == min(20, int((reference[q] > 0).sum()))
        got = torch.tensor([score for _, score in ranked])
        expected = torch.tensor([reference[q, row[d]].item() for d, _ in ranked])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        left_out = reference[q].clone()
        left_out[[row[d] for d, _ in ranked]] = float("-inf")
        assert left_out.max() <= got.min() + 1e-5  # nothing better was left out


def test_ndcg_on_a_scifact_subset(subset: dict) -> None:
    """A sanity check of the whole path (columns, rows, ids): random distractors make this subset
    easy, so the bar is high; a broken mapping scores near 0.03. Full-corpus numbers: the report."""
    evaluator = RetrievalEvaluator(measures=("ndcg_cut.10", "recall.100"), drop_self_hits=True)
    searcher = SparseTorchSearcher(subset["index"])
    siamese = evaluator(searcher.search(subset["query_ids"], subset["splade_queries"]), subset["qrels"])
    inference_free = evaluator(searcher.search(subset["query_ids"], subset["idf_queries"]), subset["qrels"])
    assert siamese["ndcg@10"] > 0.6  # 0.90 measured (201 documents)
    assert inference_free["ndcg@10"] > 0.6  # 0.89 measured


def test_index_files_and_manifest(subset: dict) -> None:
    manifest, index = subset["manifest"], subset["index"]
    assert manifest.kind == "sparse_torch" and manifest.num_docs == subset["docs"].shape[0]
    assert manifest.encoder == SPLADE_TINY.resolve().as_posix() and len(manifest.encoder_checksum) == 64
    assert manifest.extra == {"vocab_size": 30522, "nnz": subset["docs"].values().numel()}
    state = torch.load(index / "vectors.pt", weights_only=True)
    assert set(state) == {"crow_indices", "col_indices", "values", "shape"}
    assert len(json.loads((index / "doc_ids.json").read_text())) == manifest.num_docs
    assert not partial_dir(index).exists()


def test_tie_break_by_doc_index_and_zero_scores_left_out(tmp_path: Path, corpus_file: Path) -> None:
    docs = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [2.0, 0, 0]]).to_sparse_csr()
    build(["a", "b", "c", "d"], docs, tmp_path / "idx", corpus_file)
    searcher = SparseTorchSearcher(tmp_path / "idx")
    queries = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]).to_sparse_csr()
    top2 = searcher.search(["q1", "q2", "q3"], queries, k=2)
    assert top2["q1"] == {"d": 2.0, "a": 1.0}  # "a" and "b" tie: the lower row wins
    assert top2["q2"] == {}  # no shared term: nothing returned
    everything = searcher.search(["q1", "q2", "q3"], queries, k=10, batch_size=1)
    assert everything["q1"] == {"d": 2.0, "a": 1.0, "b": 1.0}  # "c" shares no term
    assert everything["q3"] == {"d": 2.0, "a": 1.0, "b": 1.0, "c": 1.0}
    with pytest.raises(ValueError, match="V=4"):
        searcher.search(["q"], torch.ones(1, 4).to_sparse_csr())
    with pytest.raises(ValueError, match="query ids"):
        searcher.search(["q"], queries)


def test_refuses_missing_half_built_and_other_kinds(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(IndexFormatError, match="no such index"):
        SparseTorchSearcher(tmp_path / "nowhere")
    docs = torch.eye(3).to_sparse_csr()
    build(["a", "b", "c"], docs, tmp_path / "idx", corpus_file)
    with pytest.raises(IndexFormatError, match="already exists"):
        build(["a", "b", "c"], docs, tmp_path / "idx", corpus_file)
    build(["x", "y", "z"], docs, tmp_path / "idx", corpus_file, overwrite=True)
    assert SparseTorchSearcher(tmp_path / "idx").doc_ids == ["x", "y", "z"]

    (tmp_path / "idx" / MANIFEST).unlink()  # as if the build had died before its last step
    with pytest.raises(IndexFormatError, match="not a finished Sparrow index"):
        SparseTorchSearcher(tmp_path / "idx")
    manifest = Manifest("bm25", "bm25", "", "lucene-english", 3, "c", "x")
    write_manifest(tmp_path / "idx", manifest)
    with pytest.raises(IndexFormatError, match="'bm25' index, not 'sparse_torch'"):
        SparseTorchSearcher(tmp_path / "idx")


def test_build_validates_and_removes_shards(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(ValueError, match="2 vectors for 3 doc ids"):
        build(["a", "b", "c"], torch.eye(2).to_sparse_csr(), tmp_path / "idx", corpus_file)
    with pytest.raises(ValueError, match="distinct"):
        build(["a", "a"], torch.eye(2).to_sparse_csr(), tmp_path / "idx", corpus_file)
    with pytest.raises(ValueError, match="CSR"):
        build(["a", "b"], torch.eye(2), tmp_path / "idx", corpus_file)
    (partial_dir(tmp_path / "idx") / "shards").mkdir(parents=True)  # left by encode_in_shards
    build(["a", "b"], torch.eye(2).to_sparse_csr(), tmp_path / "idx", corpus_file)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "doc_ids.json",
        "manifest.json",
        "vectors.pt",
    ]
