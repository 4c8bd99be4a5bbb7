"""retrieval.teachers end to end on a tiny BEIR folder: candidates, every teacher's score checked
against its model scored directly, and the reader's refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from retrieval import teachers as teachers_cli
from retrieval.cli import ConfigError
from retrieval.data.beir import document_texts, load_beir
from retrieval.data.teacher_scores import (
    TEACHER_COLUMNS,
    TeacherScoresError,
    read_teacher_scores,
    teacher_columns,
)
from retrieval.data.training import TrainingSet, load_training_set
from tests.retrieval.helpers import SPLADE_TINY, compose_job, write_beir

REPO = Path(__file__).resolve().parents[2]
DEPTH, BM25_DEPTH = 4, 8

QUERIES = {  # id -> (text, positives); "comet-4" is also a document id: a self hit to drop
    "q1": ("which insects make honey", ["bees-0", "bees-1", "comet-0"]),  # comet-0 shares no term with q1
    "q2": ("what happens when magma reaches the surface", ["volcano-0"]),
    "q3": ("hormone controlling blood sugar", ["insulin-0"]),
    "comet-4": ("notes on a comet tail", ["comet-0"]),
    "q5": ("flour for bread", ["wheat-0", "wheat-3"]),
    "q6": ("ice carving valleys", ["glacier-0"]),
}
NOTE = "Notes {i} on {name}: a survey of municipal budget tables, page {i}, honey {i}."


def _beir_folder(root: Path) -> Path:
    """Six topics of five documents: one topical, four notes that share the topic's name."""
    return write_beir(root, {"train": QUERIES}, notes=4, note=NOTE)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of the job (Lucene, MiniLM and splade-tiny), shared by the checks below."""
    tmp = tmp_path_factory.mktemp("teachers")
    beir = _beir_folder(tmp / "tinytrain")
    overrides = [
        f"dataset.path={beir}",
        f"paths.indexes_dir={tmp / 'indexes'}",
        f"models.splade.encoder.model={SPLADE_TINY}",
        f"depth={DEPTH}",
        f"bm25_depth={BM25_DEPTH}",
    ]
    out = teachers_cli.run(compose_job("retrieval_teachers", overrides, tmp / "out"))
    data = load_beir(str(beir), split="train")
    training = load_training_set(data)
    return {"out": out, "data": data, "training": training, "indexes": tmp / "indexes" / "tinytrain"}


@pytest.fixture(scope="module")
def frame(job: dict) -> pl.DataFrame:
    return pl.read_parquet(job["out"])


def _pairs(frame: pl.DataFrame) -> tuple[list[str], list[str]]:
    return frame["query_id"].to_list(), frame["doc_id"].to_list()


def test_file_schema_and_sidecar(job: dict, frame: pl.DataFrame) -> None:
    assert job["out"] == job["indexes"] / "teachers" / "train.parquet"
    assert frame.schema == pl.Schema(
        {
            "query_id": pl.Utf8,
            "doc_id": pl.Utf8,
            "label": pl.Int32,
            "bm25_rank": pl.Int32,
            "dense_rank": pl.Int32,
            "bm25": pl.Float32,
            "dense": pl.Float32,
            "splade": pl.Float32,
        }
    )
    assert teacher_columns(frame) == list(TEACHER_COLUMNS)
    assert frame.select("query_id", "doc_id").is_unique().all()
    sidecar = json.loads(job["out"].with_name("train.parquet.json").read_text())
    assert sidecar["teachers"] == ["bm25", "dense", "splade"]
    assert sidecar["models"]["splade"]["name"] == str(SPLADE_TINY.resolve())
    assert sidecar["models"]["dense"]["checksum"] and sidecar["models"]["splade"]["checksum"]
    assert sidecar["depth"] == DEPTH and sidecar["bm25_depth"] == BM25_DEPTH
    assert sidecar["counts"]["queries"] == 6 and sidecar["counts"]["rows"] == frame.height
    assert sidecar["training"]["qrels"].endswith("qrels/train.tsv") and sidecar["created"]
    positives = sum(len(p) for _, p in QUERIES.values())
    assert sidecar["miner_recall"]["bm25"]["positives"] == positives
    found = frame.filter((pl.col("label") > 0) & pl.col("dense_rank").is_not_null()).height
    assert sidecar["miner_recall"]["dense"]["found"] == found
    # the sparse encoding sits in the cache the sparse indexes share, beside the faiss build's
    assert len(list((job["indexes"] / ".encodings").iterdir())) == 2


def test_candidates_are_positives_plus_mined_lists(frame: pl.DataFrame) -> None:
    for qid, (_, positives) in QUERIES.items():
        rows = frame.filter(pl.col("query_id") == qid)
        assert set(positives) <= set(rows["doc_id"])
        labels = dict(zip(rows["doc_id"], rows["label"], strict=True))
        assert all(labels[d] == (1 if d in positives else 0) for d in labels)
        assert sorted(rows["dense_rank"].drop_nulls()) == list(range(1, DEPTH + 1))  # 1..depth, once each
        bm25 = sorted(rows["bm25_rank"].drop_nulls())  # BM25 may match fewer documents than depth
        assert bm25 == list(range(1, len(bm25) + 1)) and len(bm25) <= DEPTH
        unranked = rows.filter(pl.col("bm25_rank").is_null() & pl.col("dense_rank").is_null())
        assert set(unranked["doc_id"]) <= set(positives)
    assert frame.filter(pl.col("query_id") == pl.col("doc_id")).height == 0  # self hit dropped


def test_bm25_equals_the_searcher(job: dict, frame: pl.DataFrame) -> None:
    from retrieval.index.bm25 import BM25Searcher

    queries = {qid: text for qid, (text, _) in QUERIES.items()}
    run = BM25Searcher(job["indexes"] / "bm25").search(queries, k=BM25_DEPTH)
    assert "comet-4" in run["comet-4"]  # the self hit was retrieved, and left out of the candidates
    floors = set()
    for qid, doc, rank, score in frame.select("query_id", "doc_id", "bm25_rank", "bm25").iter_rows():
        ranked = [d for d, _ in run.ranked(qid) if d != qid]
        cut = len(run[qid]) == BM25_DEPTH
        if doc in run[qid]:
            assert score == pytest.approx(run[qid][doc], abs=1e-6)
        else:  # the floor: the lowest retrieved score when the list was cut, else 0
            assert score == pytest.approx(min(run[qid].values()) if cut else 0.0)
            floors.add(cut)
        if rank is not None:
            assert ranked[rank - 1] == doc
        else:
            assert doc not in ranked[:DEPTH]
    assert floors == {True, False}  # both floors were met (q1's list is cut: "honey" is in every note)


def test_dense_equals_direct_minilm_dot_products(job: dict, frame: pl.DataFrame) -> None:
    from retrieval.encoders.dense import DenseEncoder

    encoder = DenseEncoder()
    qids, docs = _pairs(frame)
    texts = dict(zip(job["data"].corpus["doc_id"], document_texts(job["data"].corpus), strict=True))
    q = encoder.encode([QUERIES[x][0] for x in qids])  # (P, d)
    d = encoder.encode([texts[x] for x in docs])  # (P, d)
    assert frame["dense"].to_list() == pytest.approx((q * d).sum(1).tolist(), abs=1e-5)
    for qid in QUERIES:  # dense_rank follows the dense score
        rows = frame.filter(pl.col("query_id") == qid)
        scores = rows.filter(pl.col("dense_rank").is_not_null()).sort("dense_rank")["dense"].to_list()
        assert all(a >= b - 1e-5 for a, b in zip(scores, scores[1:], strict=False))
        unranked = rows.filter(pl.col("dense_rank").is_null())["dense"]
        assert all(s <= scores[-1] + 1e-5 for s in unranked)


def test_splade_equals_direct_splade_dot_products(job: dict, frame: pl.DataFrame) -> None:
    from retrieval.encoders.splade import SpladeEncoder

    encoder = SpladeEncoder(SPLADE_TINY)
    qids, docs = _pairs(frame)
    texts = dict(zip(job["data"].corpus["doc_id"], document_texts(job["data"].corpus), strict=True))
    q = encoder.encode([QUERIES[x][0] for x in qids]).to_dense()  # (P, V)
    d = encoder.encode([texts[x] for x in docs]).to_dense()  # (P, V)
    expected = (q.double() * d.double()).sum(1).tolist()
    assert frame["splade"].to_list() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert max(expected) > 1.0  # real overlaps, not all zeros


def test_reader_accepts_the_job_output(job: dict, frame: pl.DataFrame) -> None:
    read = read_teacher_scores(job["out"], job["training"])
    assert read.equals(frame)


def _refused(tmp_path: Path, frame: pl.DataFrame, training: TrainingSet | None, match: str) -> None:
    path = tmp_path / "scores.parquet"
    frame.write_parquet(path)
    with pytest.raises(TeacherScoresError, match=match) as err:
        read_teacher_scores(path, training)
    assert str(path) in str(err.value)


def test_reader_refusals(job: dict, frame: pl.DataFrame, tmp_path: Path) -> None:
    training = job["training"]
    with pytest.raises(TeacherScoresError, match="no such file"):
        read_teacher_scores(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TeacherScoresError, match="not a readable parquet file"):
        read_teacher_scores(tmp_path / "junk.parquet")
    _refused(tmp_path, frame.head(0), None, r"empty \(0 rows\)")
    _refused(tmp_path, frame.drop("label"), None, r"missing columns \['label'\]")
    _refused(tmp_path, frame.drop(*TEACHER_COLUMNS), None, "no teacher column")
    nan = pl.when(pl.col("doc_id") == "bees-0").then(math.nan).otherwise("dense").cast(pl.Float32)
    _refused(tmp_path, frame.with_columns(dense=nan), None, r"1 non-finite or null 'dense' scores")
    nulls = frame.with_columns(bm25=pl.lit(None, dtype=pl.Float32))
    _refused(tmp_path, nulls, None, rf"{frame.height} non-finite or null 'bm25' scores")
    _refused(tmp_path, pl.concat([frame, frame.head(2)]), None, r"2 \(query_id, doc_id\) pairs repeated")
    q1 = pl.col("query_id") == "q1"
    ghost_q = frame.with_columns(query_id=pl.when(q1).then(pl.lit("ghost")).otherwise("query_id"))
    _refused(tmp_path, ghost_q, training, r"1 query ids are not training queries of tinytrain/train .*ghost")
    nowhere = pl.when(pl.col("label") > 0).then(pl.lit("nowhere")).otherwise("doc_id")
    ghost_d = frame.with_columns(doc_id=nowhere).unique(["query_id", "doc_id"])
    _refused(tmp_path, ghost_d, training, r"1 doc ids are not in .*corpus.jsonl \(30 documents\): 'nowhere'")
    # without the training set, ids are not checked
    assert read_teacher_scores(tmp_path / "scores.parquet").height > 0


@pytest.mark.parametrize(
    ("override", "match"),
    [("teachers=[bm25,cross]", "teachers must be"), ("bm25_depth=2", r"bm25_depth \(2\) must be >= depth")],
)
def test_bad_config_is_refused(tmp_path: Path, override: str, match: str) -> None:
    overrides = [f"dataset.path={tmp_path}", f"paths.indexes_dir={tmp_path}", override]
    cfg = compose_job("retrieval_teachers", overrides, tmp_path)
    with pytest.raises(ConfigError, match=match):
        teachers_cli.run(cfg)


def test_cli_refuses_unknown_ids_in_one_line(tmp_path: Path) -> None:
    beir = _beir_folder(tmp_path / "tinytrain")
    qrels = tmp_path / "train.qrel"
    qrels.write_text("q1 0 bees-0 1\nq1 0 missing-doc 1\n")
    cmd = [sys.executable, "-m", "retrieval.teachers", f"dataset.path={beir}", f"train.qrels={qrels}",
           f"paths.indexes_dir={tmp_path / 'ix'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert f"{qrels}:2: doc 'missing-doc' is not in corpus.jsonl (30 documents)" in out
    assert "pass drop_unknown=true" in out and not (tmp_path / "ix").exists()
