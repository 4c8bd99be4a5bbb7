"""BM25 over a Lucene index, built and searched exactly as Pyserini's BEIR "flat" BM25 baselines.

Robertson and Zaragoza, *The Probabilistic Relevance Framework: BM25 and Beyond*, Foundations
and Trends in IR 3(4), 2009; Lucene's variant as used by Anserini/Pyserini (Lin et al., SIGIR
2021, https://github.com/castorini/pyserini). A document ``d`` scores, for query terms ``t``:

.. math::

    s(q, d) = \\sum_{t \\in q} \\mathrm{idf}(t) \\cdot
        \\frac{\\mathrm{tf}_{t,d}}{\\mathrm{tf}_{t,d} + k_1 (1 - b + b \\, |d| / \\mathrm{avgdl})},
    \\qquad \\mathrm{idf}(t) = \\ln\\left(1 + \\frac{N - \\mathrm{df}_t + 0.5}{\\mathrm{df}_t + 0.5}\\right)

with Lucene's lossy one-byte encoding of ``|d|``, terms from Anserini's default English
analyzer (lower-casing, Lucene's English stop words, Porter stemming), ``k1 = 0.9, b = 0.4``
by default. A document is ``title + " " + text``, as in Pyserini's BEIR flat indexes.

Scores are Anserini's: rounded to 1e-4, and among documents tied at that precision the n-th
(in doc id order, ascending) is lowered by ``n * 1e-6``, so that trec_eval's order of a run
equals Anserini's. Runs are therefore identical to those of ``python -m pyserini.search.lucene
--bm25`` on the same index (tested).

Example::

    manifest = build_bm25(data.corpus, "indexes/scifact-bm25", data.path / "corpus.jsonl")
    run = BM25Searcher("indexes/scifact-bm25").search(dict(zip(ids, texts)), k=1000)
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import polars as pl

from retrieval.index.manifest import Manifest, building, checksum, read_manifest, write_manifest
from retrieval.lucene import index_collection, pyserini_module, run_from_hits, write_collection
from retrieval.types import Run

log = logging.getLogger(__name__)

KIND = "bm25"
TOKENIZER = "lucene-english"  # Anserini's DefaultEnglishAnalyzer: Porter stemmer, Lucene stop words
DEFAULT_K1, DEFAULT_B = 0.9, 0.4  # Anserini's defaults, used by Pyserini's BEIR flat baselines


def _documents(corpus: pl.DataFrame) -> Iterator[str]:
    """JsonCollection lines ``{"id", "contents": title + " " + text}``, one per corpus row."""
    for doc_id, title, text in corpus.select("doc_id", "title", "text").iter_rows():
        yield json.dumps({"id": doc_id, "contents": f"{title or ''} {text}"}, ensure_ascii=False)


def _check_corpus(corpus: pl.DataFrame) -> None:
    missing = [c for c in ("doc_id", "title", "text") if c not in corpus.columns]
    if missing:
        raise ValueError(f"corpus lacks columns {missing}; expected doc_id, title, text (load_beir's corpus)")
    if corpus["doc_id"].n_unique() != corpus.height:
        raise ValueError("corpus doc_id values are not unique; Lucene would index both and runs repeat ids")


def build_bm25(
    corpus: pl.DataFrame,
    out_dir: str | Path,
    corpus_path: str | Path,
    threads: int = 1,
    overwrite: bool = False,
    *,
    k1: float = DEFAULT_K1,
    b: float = DEFAULT_B,
) -> Manifest:
    """Index ``corpus`` with Lucene for BM25 (Anserini's ``IndexCollection``, default analyzer).

    The corpus is written as a temporary JsonCollection next to ``out_dir``, indexed into the
    build directory, and deleted; the manifest is written last and the directory renamed into
    place (:func:`~retrieval.index.manifest.building`). No positions, document vectors or raw
    text are stored: enough for BM25, not for phrase queries or RM3.

    Args:
        corpus: (pl.DataFrame) ``doc_id`` (str, unique), ``title`` (str or null), ``text`` (str),
            e.g. :func:`retrieval.data.beir.load_beir`'s ``corpus``.
        out_dir: (str | Path) the index directory to create.
        corpus_path: (str | Path) the file ``corpus`` was read from; its sha256 goes into the manifest.
        threads: (int, default 1) indexing threads.
        overwrite: (bool, default False) replace an existing index at ``out_dir``.
        k1: (float, default 0.9) BM25 ``k1`` recorded in the manifest; searches use it by default.
        b: (float, default 0.4) BM25 ``b``, likewise.

    Returns:
        the manifest written (kind ``"bm25"``, encoder ``"bm25"``, tokenizer ``"lucene-english"``,
        ``extra={"k1": k1, "b": b}``).

    Raises:
        ValueError: ``corpus`` lacks a column or repeats a doc id.
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is False.
    """
    _check_corpus(corpus)
    corpus_sum = checksum([corpus_path])
    out_dir = Path(out_dir)
    start = time.perf_counter()
    with building(out_dir, overwrite) as work:
        with tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.collection.", dir=work.parent) as tmp:
            write_collection(_documents(corpus), corpus.height, tmp, shards=threads)
            indexed = index_collection(tmp, work, "JsonCollection", corpus.height, threads)
        manifest = Manifest(
            kind=KIND,
            encoder="bm25",
            encoder_checksum="",
            tokenizer=TOKENIZER,
            num_docs=indexed,
            corpus=str(corpus_path),
            corpus_checksum=corpus_sum,
            build_seconds=round(time.perf_counter() - start, 3),
            extra={"k1": k1, "b": b},
        )
        write_manifest(work, manifest)
    log.info("BM25 index of %d documents written to %s", indexed, out_dir)
    return manifest


class BM25Searcher:
    """BM25 search of an index written by :func:`build_bm25`, through Pyserini's ``LuceneSearcher``.

    Args:
        index_dir: (str | Path) the index directory; refused unless its manifest is a ``"bm25"`` one.
        k1: (float | None, default None) BM25 ``k1``; None uses the manifest's (0.9 unless set at build).
        b: (float | None, default None) BM25 ``b``; None uses the manifest's (0.4 unless set at build).

    Raises:
        IndexFormatError: the directory has no readable manifest, or one of another kind.
    """

    def __init__(self, index_dir: str | Path, k1: float | None = None, b: float | None = None):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, kind=KIND)
        self.k1 = float(self.manifest.extra.get("k1", DEFAULT_K1) if k1 is None else k1)
        self.b = float(self.manifest.extra.get("b", DEFAULT_B) if b is None else b)
        self._searcher = pyserini_module("pyserini.search.lucene").LuceneSearcher(str(self.index_dir))
        self._searcher.set_bm25(self.k1, self.b)

    def search(self, queries: Mapping[str, str], k: int = 1000, threads: int = 1) -> Run:
        """The top ``k`` documents of every query.

        Args:
            queries: (Mapping[str, str]) query id -> query text.
            k: (int, default 1000) documents per query.
            threads: (int, default 1) search threads.

        Returns:
            a :class:`Run` with every query (an empty ranking when nothing matches, e.g. a
            query of stop words only).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        qids = list(queries)
        hits = self._searcher.batch_search([queries[q] for q in qids], qids, k=k, threads=threads)
        run = run_from_hits(hits, qids, name=f"bm25-k1={self.k1}-b={self.b}")
        empty = sum(not run[q] for q in qids)
        if empty:
            log.warning("%d of %d queries matched no document in %s", empty, len(qids), self.index_dir)
        return run

    def __repr__(self) -> str:
        docs = self.manifest.num_docs
        return f"BM25Searcher({str(self.index_dir)!r}, k1={self.k1}, b={self.b}, docs={docs})"
