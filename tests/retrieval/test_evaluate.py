"""retrieval.evaluate / retrieval.index / retrieval.search end to end on a BEIR folder never seen before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval import evaluate as evaluate_cli
from retrieval import search as search_cli
from retrieval.index.manifest import MANIFEST
from tests.retrieval.helpers import SPLADE_TINY, compose_job, write_beir

REPO = Path(__file__).resolve().parents[2]

QUERIES = {
    "q1": ("which insects make honey", ["bees-0"]),
    "q2": ("what happens when magma reaches the surface", ["volcano-0"]),
    "q3": ("hormone controlling blood sugar", ["insulin-0"]),
    "q4": ("why does a comet have a tail", ["comet-0"]),
}
NOTE = "Notes {i} on {name}: a survey of unrelated municipal budget tables, page {i}."


def _beir_folder(root: Path) -> Path:
    """Six topics, each with a relevant document and two distractors that share little with it."""
    return write_beir(root, {"test": QUERIES}, notes=2, note=NOTE)


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _beir_folder(tmp_path_factory.mktemp("unseen") / "tinybeir")


def _evaluate(beir_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    args = [f"dataset.path={beir_dir}", f"paths.indexes_dir={tmp_path / 'indexes'}", "latency_queries=4"]
    return evaluate_cli.run(compose_job("retrieval_evaluate", [*args, *overrides], tmp_path / "out"))


def test_bm25_on_an_unseen_beir_folder(beir_dir: Path, tmp_path: Path) -> None:
    metrics = _evaluate(beir_dir, tmp_path, "index=bm25")
    assert metrics["ndcg@10"] == pytest.approx(1.0)  # every relevant document ranks first
    assert metrics["recall@100"] == 1.0 and metrics["mrr@10"] == 1.0
    assert metrics["latency_queries"] == 4 and metrics["latency_p99_ms"] >= metrics["latency_median_ms"] > 0
    assert metrics["index_mb"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "bm25 on tinybeir" in report and "self hits dropped: True" in report
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"]["test"]["ndcg@10"] == metrics["ndcg@10"]
    assert saved["timings_s"]["build"] > 0
    run_lines = (tmp_path / "out" / "run.trec").read_text().splitlines()
    assert run_lines[0].split()[:3] == ["q1", "Q0", "bees-0"]
    # a second evaluation reuses the index (no build) and gives the same numbers
    again = _evaluate(beir_dir, tmp_path, "index=bm25")
    assert again["ndcg@10"] == metrics["ndcg@10"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["timings_s"]["build"] == 0.0


@pytest.mark.parametrize("query", ["splade", "idf"])
def test_splade_impact_and_exact_scoring_agree(beir_dir: Path, tmp_path: Path, query: str) -> None:
    model = f"index.encoder.model={SPLADE_TINY}"
    exact = _evaluate(beir_dir, tmp_path, "index=sparse_torch", f"index.query={query}", model)
    impact = _evaluate(beir_dir, tmp_path, "index=impact", f"index.query={query}", model)
    gpu = _evaluate(beir_dir, tmp_path, "index=sparse_gpu", f"index.query={query}", model)  # fp16 postings
    assert exact["ndcg@10"] > 0.7  # splade-tiny finds the topical documents
    assert abs(impact["ndcg@10"] - exact["ndcg@10"]) <= 0.002
    assert abs(gpu["ndcg@10"] - exact["ndcg@10"]) <= 0.002 and gpu["avg_doc_nnz"] == exact["avg_doc_nnz"]
    assert exact["avg_doc_nnz"] > exact["avg_query_nnz"] > 0 and exact["flops"] > 0
    # impact, sparse_torch and sparse_gpu share one encoding of the corpus
    assert len(list((tmp_path / "indexes" / "tinybeir" / ".encodings").iterdir())) == 1
    if query == "idf":
        assert (tmp_path / "indexes" / "tinybeir" / "sparse_torch" / "idf.json").is_file()


def test_search_writes_a_trec_run(beir_dir: Path, tmp_path: Path) -> None:
    _evaluate(beir_dir, tmp_path, "index=bm25")
    run_file = tmp_path / "bm25.trec"
    args = [f"dataset.path={beir_dir}", f"paths.indexes_dir={tmp_path / 'indexes'}", f"run_file={run_file}"]
    result = search_cli.run(compose_job("retrieval_search", [*args, "index=bm25"], tmp_path / "s"))
    assert set(result) == set(QUERIES)
    assert run_file.read_text().splitlines()[0].startswith("q1 Q0 bees-0 1 ")


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd / 'run'}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert expected in out and "Traceback" not in out, out


def test_a_half_built_index_is_refused(beir_dir: Path, tmp_path: Path) -> None:
    index = tmp_path / "indexes" / "tinybeir" / "bm25"
    index.mkdir(parents=True)
    (index / "segments_1").write_text("partial")
    proc = _cli("retrieval.evaluate", f"dataset.path={beir_dir}", f"paths.indexes_dir={tmp_path / 'indexes'}",
                cwd=tmp_path)  # fmt: skip
    _one_line_error(proc, f"{index}: no {MANIFEST}; this is not a finished Sparrow index")


def test_an_index_of_another_corpus_is_refused(beir_dir: Path, tmp_path: Path) -> None:
    _evaluate(beir_dir, tmp_path, "index=bm25")
    other = _beir_folder(tmp_path / "other" / "tinybeir")
    with open(other / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "extra", "text": "one more document"}) + "\n")
    proc = _cli("retrieval.evaluate", f"dataset.path={other}", f"paths.indexes_dir={tmp_path / 'indexes'}",
                cwd=tmp_path)  # fmt: skip
    _one_line_error(proc, "pass overwrite=true to rebuild it")


def test_unknown_index_lists_the_available_ones(tmp_path: Path) -> None:
    proc = _cli("retrieval.index", "+index=bm52", cwd=tmp_path)
    _one_line_error(
        proc, "unknown index 'bm52' in +index=bm52; available: bm25, faiss, impact, sparse_gpu, sparse_torch"
    )


def test_index_job_builds_with_a_manifest(beir_dir: Path, tmp_path: Path) -> None:
    proc = _cli("retrieval.index", "+index=bm25", f"dataset.path={beir_dir}", f"index_dir={tmp_path / 'ix'}",
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert manifest["kind"] == "bm25" and manifest["num_docs"] == 18
    assert not (tmp_path / "ix.partial").exists()


def test_dense_faiss_on_an_unseen_beir_folder(beir_dir: Path, tmp_path: Path) -> None:
    metrics = _evaluate(beir_dir, tmp_path, "index=faiss")
    assert metrics["ndcg@10"] > 0.9  # MiniLM puts each topical document first
    assert "flops" not in metrics and metrics["index_mb"] > 0
    hnsw = _evaluate(beir_dir, tmp_path, "index=faiss", "index.factory=HNSW32", "overwrite=true")
    assert hnsw["ndcg@10"] == pytest.approx(metrics["ndcg@10"])
