"""BEIR-format retrieval datasets: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Thakur et al., *BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information
Retrieval Models*, NeurIPS 2021 Datasets and Benchmarks. https://github.com/beir-cellar/beir

The format, as read here:

* ``corpus.jsonl``: one JSON object per line with ``_id`` (string or integer), ``text``
  (string) and an optional ``title`` (string or null); other fields are ignored.
* ``queries.jsonl``: one JSON object per line with ``_id`` and ``text``.
* ``qrels/<split>.tsv``: a header line (``query-id<TAB>corpus-id<TAB>score``), then one
  judgement per line with an integer score (labels <= 0 are non-relevant, as in trec_eval).

Anything else is a :class:`DataFormatError` naming the file and the 1-based line. Every qrels
query must be in ``queries.jsonl`` and every judged document in ``corpus.jsonl`` (BEIR's own
loader silently drops such pairs; Sparrow refuses them so that metrics are never computed on
a silently shrunken qrels). Blank lines are skipped.

Parsed tables are cached as parquet through :func:`retrieval.data.source.cached_tables`, so a
second load of the same files is fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retrieval.data.errors import DataFormatError, DatasetNotFoundError
from retrieval.data.source import DatasetSource, RemoteFile, cached_tables, resolve_dataset_dir
from retrieval.types import Qrels

log = logging.getLogger(__name__)

READER_VERSION = "beir-1"  # bump whenever the tables built here change
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"


def _beir_source(name: str, md5: str) -> DatasetSource:
    """A BEIR dataset: the official zip (md5-verified) holding ``<name>/`` in BEIR format."""
    zipped = RemoteFile(url=f"{BEIR_URL}/{name}.zip", sha256=None, md5=md5, extract=True, strip=f"{name}/")
    return DatasetSource(
        name=name,
        required=("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"),
        remote=(zipped,),
        card=f"datasets/{name}/README.md",
    )


# md5s as published in the "Available Datasets" table of BEIR's README (github.com/beir-cellar/beir).
BEIR_SOURCES: dict[str, DatasetSource] = {
    "scifact": _beir_source("scifact", "5f7d1de60b170fc8027bb7898e2efca1"),
    "nfcorpus": _beir_source("nfcorpus", "a89dba18a62ef92f7d323ec890a0d38d"),
}


@dataclass(frozen=True)
class BeirData:
    """One split of a BEIR-format dataset.

    Attributes:
        name: (str) dataset name (the folder name for a plain path).
        split: (str) qrels split, e.g. ``"test"``.
        corpus: DataFrame ``doc_id`` (Utf8, raw id), ``title`` (Utf8, "" when absent),
            ``text`` (Utf8), ``doc`` (Int64, contiguous index 0..N-1 in file order).
        queries: DataFrame ``query_id`` (Utf8), ``text`` (Utf8), in file order; only the
            queries judged in this split unless ``all_queries=True``.
        qrels: the split's judgements, ``query id -> {doc id: label}`` (raw ids).
        path: (Path) the dataset folder that was read.
    """

    name: str
    split: str
    corpus: pl.DataFrame
    queries: pl.DataFrame
    qrels: Qrels
    path: Path

    @property
    def num_docs(self) -> int:
        return self.corpus.height

    def __repr__(self) -> str:
        return (
            f"BeirData(name={self.name!r}, split={self.split!r}, docs={self.corpus.height}, "
            f"queries={self.queries.height}, qrels_pairs={self.qrels.num_pairs()})"
        )


def document_texts(corpus: pl.DataFrame) -> list[str]:
    """``title + " " + text`` of every document, stripped (BEIR's and Pyserini's convention)."""
    return [f"{t} {x}".strip() for t, x in zip(corpus["title"], corpus["text"], strict=True)]


# --------------------------------------------------------------------------- parsing


def _lines(path: Path):
    """Yield ``(1-based line number, decoded line without newline)``, skipping blank lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, lineno, "UTF-8 text", str(e)) from e
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


class _Problems:
    """Bad lines of one file, collected so that the error gives counts, not just the first."""

    def __init__(self, path: Path):
        self.path = path
        self.kinds: dict[str, list[tuple[int, str]]] = {}  # what was expected -> [(line, found)]

    def add(self, expected: str, lineno: int, found: str) -> None:
        self.kinds.setdefault(expected, []).append((lineno, found))

    def raise_if_any(self) -> None:
        """One :class:`DataFormatError` at the first bad line, counting every kind of problem."""
        if not self.kinds:
            return
        first = min(lines[0][0] for lines in self.kinds.values())
        found = next(f for lines in self.kinds.values() for n, f in lines if n == first)
        parts = [
            f"{expected} ({len(lines)} line{'s' if len(lines) > 1 else ''} fail: "
            f"{', '.join(str(n) for n, _ in lines[:5])}{', ...' if len(lines) > 5 else ''})"
            for expected, lines in self.kinds.items()
        ]
        raise DataFormatError(self.path, first, "; ".join(parts), found)


def _read_jsonl(path: Path, kind: str, with_title: bool) -> dict[str, list[str]]:
    """Parse a BEIR corpus or queries file into columns ``id``, ``text`` (and ``title``).

    Malformed JSON stops at once. Missing or invalid ``_id``/``text``/``title`` fields,
    duplicate ids and (for queries) empty texts are collected over the whole file and
    reported together, with counts and line numbers.
    """
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    first_seen: dict[str, int] = {}
    problems = _Problems(path)
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, f"one JSON object per line ({e.msg})", line) from e
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, "a JSON object", line)
        if "_id" not in obj:
            problems.add(f"an '_id' field in each {kind}", lineno, line)
            continue
        value = obj["_id"]
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
            problems.add("'_id' to be a non-empty string or integer", lineno, line)
            continue
        key = str(value)
        text = obj.get("text")
        if "text" not in obj:
            problems.add(f"a 'text' field in each {kind}", lineno, line)
        elif not isinstance(text, str):
            problems.add("'text' to be a string", lineno, line)
        elif kind == "query" and not text.strip():
            problems.add("a non-empty query text", lineno, line)
        if key in first_seen:
            problems.add(f"unique {kind} ids", lineno, f"{key!r} again (first on line {first_seen[key]})")
            continue
        first_seen[key] = lineno
        title = obj.get("title") if with_title else ""
        if title is None:
            title = ""
        if not isinstance(title, str):
            problems.add("'title' to be a string or null", lineno, line)
        ids.append(key)
        texts.append(text if isinstance(text, str) else "")
        titles.append(title if isinstance(title, str) else "")
    problems.raise_if_any()
    if kind == "document":
        _report_empty_documents(path, ids, titles, texts)
    cols = {"id": ids, "text": texts}
    if with_title:
        cols["title"] = titles
    return cols


def _report_empty_documents(path: Path, ids: list[str], titles: list[str], texts: list[str]) -> None:
    """Documents with neither title nor text are kept (they can still be judged) but reported."""
    pairs = enumerate(zip(titles, texts, strict=True))
    empty = [i for i, (title, text) in pairs if not (title + text).strip()]
    if empty:
        shown = ", ".join(repr(ids[i]) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        log.warning("%s: %d empty document(s) kept (no title, no text): %s", path, len(empty), shown)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _read_qrels(path: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """Parse a BEIR qrels TSV into (query ids, doc ids, scores, line numbers)."""
    qids: list[str] = []
    dids: list[str] = []
    scores: list[int] = []
    linenos: list[int] = []
    first_seen: dict[tuple[str, str], int] = {}
    header_seen = False
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if not header_seen:
            header_seen = True
            if len(cols) == 3 and not _is_int(cols[2].strip()):
                continue
            raise DataFormatError(path, lineno, "the header 'query-id<TAB>corpus-id<TAB>score'", line)
        if len(cols) != 3:
            raise DataFormatError(
                path, lineno, f"3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}", line
            )
        qid, did, score = (c.strip() for c in cols)
        if not qid or not did:
            raise DataFormatError(path, lineno, "non-empty query-id and corpus-id", line)
        try:
            label = int(score)
        except ValueError:
            raise DataFormatError(path, lineno, "an integer score", score) from None
        pair = (qid, did)
        if pair in first_seen:
            expected = f"one judgement per (query-id, corpus-id) (also on line {first_seen[pair]})"
            raise DataFormatError(path, lineno, expected, line)
        first_seen[pair] = lineno
        qids.append(qid)
        dids.append(did)
        scores.append(label)
        linenos.append(lineno)
    if not qids:
        raise DataFormatError(path, None, "at least one judgement after the header", "no judgements")
    return qids, dids, scores, linenos


def _build(folder: Path, qrels_path: Path) -> dict[str, pl.DataFrame]:
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    corpus = _read_jsonl(corpus_path, "document", with_title=True)
    queries = _read_jsonl(queries_path, "query", with_title=False)
    qids, dids, scores, linenos = _read_qrels(qrels_path)
    doc_set, query_set = set(corpus["id"]), set(queries["id"])
    problems = _Problems(qrels_path)
    for qid, did, lineno in zip(qids, dids, linenos, strict=True):
        if qid not in query_set:
            problems.add(f"a query-id present in {queries_path}", lineno, qid)
        if did not in doc_set:
            problems.add(f"a corpus-id present in {corpus_path}", lineno, did)
    problems.raise_if_any()
    n = len(corpus["id"])
    return {
        "corpus": pl.DataFrame(
            {
                "doc_id": corpus["id"],
                "title": corpus["title"],
                "text": corpus["text"],
                "doc": pl.arange(0, n, eager=True, dtype=pl.Int64),
            },
            schema={"doc_id": pl.Utf8, "title": pl.Utf8, "text": pl.Utf8, "doc": pl.Int64},
        ),
        "queries": pl.DataFrame(
            {"query_id": queries["id"], "text": queries["text"]},
            schema={"query_id": pl.Utf8, "text": pl.Utf8},
        ),
        "qrels": pl.DataFrame(
            {"query_id": qids, "doc_id": dids, "score": scores},
            schema={"query_id": pl.Utf8, "doc_id": pl.Utf8, "score": pl.Int64},
        ),
    }


# --------------------------------------------------------------------------- loading


def _is_path(name: str) -> bool:
    p = Path(name).expanduser()
    return p.is_absolute() or len(p.parts) > 1 or name.startswith((".", "~"))


def _resolve(name: str, root: str | Path | None, download: bool) -> Path:
    if _is_path(name):
        folder = Path(name).expanduser()
        if not (folder / "corpus.jsonl").is_file():
            raise DatasetNotFoundError(
                folder.name,
                folder,
                "expected a BEIR-format folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv "
                "(see datasets/README.md)",
            )
        return folder
    source = BEIR_SOURCES.get(name) or DatasetSource(
        name=name, required=("corpus.jsonl", "queries.jsonl"), remote=(), card="datasets/README.md"
    )
    return resolve_dataset_dir(source, root=root, download=download)


def load_beir(
    name: str,
    split: str = "test",
    root: str | Path | None = None,
    download: bool = False,
    *,
    all_queries: bool = False,
) -> BeirData:
    """Load one split of a BEIR-format dataset.

    Args:
        name: (str) a dataset folder name looked up as described in
            :mod:`retrieval.data.source` (``"scifact"``, ``"nfcorpus"``, or any other
            BEIR-format folder under the data root), or a path to such a folder
            (absolute, or containing a ``/``, or starting with ``.``/``~``).
        split: (str) which ``qrels/<split>.tsv`` to read. Default ``"test"``.
        root: (str | Path | None) directory holding ``<name>/`` (Hydra: ``data.root``).
        download: (bool) fetch the official BEIR zip when the files are missing (only for
            datasets with a known URL and checksum). Default False.
        all_queries: (bool) keep every query of ``queries.jsonl`` instead of only those
            judged in ``split``. Default False.

    Returns:
        BeirData with ``corpus`` (doc_id, title, text, doc), ``queries`` (query_id, text) and
        ``qrels``.

    Raises:
        DatasetNotFoundError: the folder or its qrels split is missing (the message says how
            to get it).
        DataFormatError: a file is malformed (the message names the file and line).
    """
    folder = _resolve(name, root, download)
    label = folder.name if _is_path(name) else name
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DatasetNotFoundError(
            label, qrels_path, f"no qrels for split {split!r}; available splits: {splits or 'none'}"
        )
    sources = [folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path]
    for path in sources[:2]:
        if not path.is_file():
            raise DatasetNotFoundError(label, path, "a BEIR folder needs corpus.jsonl and queries.jsonl")
    # one cache entry per (folder, split): two folders named alike (e.g. a local copy and a
    # download) must not overwrite each other's cache
    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    tables = cached_tables(
        f"beir/{folder.name}-{tag}/{split}", sources, READER_VERSION, lambda: _build(folder, qrels_path)
    )
    qrels_df = tables["qrels"]
    judged: dict[str, dict[str, int]] = {}
    for qid, did, score in qrels_df.iter_rows():
        judged.setdefault(qid, {})[did] = score
    queries = tables["queries"]
    if not all_queries:
        queries = queries.filter(pl.col("query_id").is_in(list(judged)))
    data = BeirData(
        name=label,
        split=split,
        corpus=tables["corpus"],
        queries=queries,
        qrels=Qrels(judged, name=f"{label}/{split}"),
        path=folder,
    )
    log.info("loaded %r from %s", data, folder)
    return data


__all__ = ["BEIR_SOURCES", "BeirData", "READER_VERSION", "load_beir"]
