"""Training queries and their judgements, checked against the corpus before anything trains.

A training set is a BEIR corpus (:func:`retrieval.data.beir.load_beir`) with queries and
relevance judgements that may come from the dataset's own split (``qrels/train.tsv`` with
``queries.jsonl``, e.g. SciFact's 809 training queries) or from other files, e.g. NFCorpus's
``original/train.titles.queries`` (``QID<TAB>text``) and ``original/train.2-1-0.qrel`` (TREC
qrels), which BEIR does not ship as a split.

Queries files are read by content: BEIR ``queries.jsonl`` (a ``.jsonl``/``.json`` suffix, or a
first line starting with ``{``), else one ``QID<TAB>text`` per line. Qrels files are BEIR TSV
(with the ``query-id<TAB>corpus-id<TAB>score`` header) or TREC ``qid iter docid label``
(:meth:`retrieval.types.Qrels.read`). A positive is a judgement with label > 0 (trec_eval's rule).

Checks, before any model sees the data:

* a judgement whose query has no text, or whose document is not in ``corpus.jsonl``, is an
  error naming the file, the counts and the first offending lines (``path:line: ...``); with
  ``drop_unknown=True`` such judgements are dropped with one WARNING line instead (NFCorpus's
  training qrels judge 238 documents that BEIR's corpus lacks);
* queries with no positive judgement are dropped (INFO line): nothing can be learnt from them;
* nothing left is an error.

The teacher-score file's reader and its error are in :mod:`retrieval.data.teacher_scores`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retrieval.data.beir import BeirData, _lines, _Problems, _read_jsonl
from retrieval.types import Qrels

log = logging.getLogger(__name__)

SHOWN = 3  # offending lines quoted per kind of problem


class TrainingDataError(ValueError):
    """Training queries or judgements that cannot be trained on; the message names the file."""


@dataclass(frozen=True)
class TrainingSet:
    """Training queries with at least one positive judgement, over a BEIR corpus.

    Attributes:
        name: (str) ``<dataset>/<qrels file stem>``, e.g. ``"scifact/train"``.
        corpus: DataFrame ``doc_id``, ``title``, ``text``, ``doc`` as :class:`BeirData`'s.
        queries: (dict[str, str]) query id -> text, every query with a positive, in qrels order.
        qrels: (Qrels) the judgements of those queries (labels <= 0 kept: judged non-relevant).
        dataset_path: (Path) the BEIR folder the corpus was read from.
        queries_path: (Path) the file the query texts were read from.
        qrels_path: (Path) the file the judgements were read from.
    """

    name: str
    corpus: pl.DataFrame
    queries: dict[str, str]
    qrels: Qrels
    dataset_path: Path
    queries_path: Path
    qrels_path: Path

    def positives(self, query_id: str) -> list[str]:
        """The doc ids judged relevant (label > 0) for ``query_id``, in qrels order."""
        return [d for d, label in self.qrels[query_id].items() if label > 0]

    def num_positives(self) -> int:
        return sum(len(self.positives(q)) for q in self.queries)

    def __repr__(self) -> str:
        return (
            f"TrainingSet(name={self.name!r}, docs={self.corpus.height}, queries={len(self.queries)}, "
            f"positives={self.num_positives()}, judgements={self.qrels.num_pairs()})"
        )


# --------------------------------------------------------------------------- queries


def _is_jsonl(path: Path) -> bool:
    if path.suffix in (".jsonl", ".json"):
        return True
    first = next((line for _, line in _lines(path)), "")
    return first.lstrip().startswith("{")


def _read_tsv_queries(path: Path) -> dict[str, str]:
    """``QID<TAB>text`` lines; bad lines are collected and reported together (file:line)."""
    texts: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    problems = _Problems(path)
    for lineno, line in _lines(path):
        qid, tab, text = line.partition("\t")
        qid = qid.strip()
        if not tab or not qid:
            problems.add("'QID<TAB>text' on each line", lineno, line)
        elif not text.strip():
            problems.add("a non-empty query text", lineno, line)
        elif qid in first_seen:
            problems.add("unique query ids", lineno, f"{qid!r} again (first on line {first_seen[qid]})")
        else:
            first_seen[qid] = lineno
            texts[qid] = text.strip()
    problems.raise_if_any()
    return texts


def read_queries(path: str | Path) -> dict[str, str]:
    """Query id -> text from a BEIR ``queries.jsonl`` or a ``QID<TAB>text`` file (see module doc).

    Raises:
        TrainingDataError: the file does not exist.
        DataFormatError: a malformed line (the message gives file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such queries file (train.queries)")
    if _is_jsonl(path):
        cols = _read_jsonl(path, "query", with_title=False)
        return dict(zip(cols["id"], cols["text"], strict=True))
    return _read_tsv_queries(path)


# --------------------------------------------------------------------------- judgements


def _judgement_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, query id, doc id)`` of each judgement of a BEIR TSV or TREC qrels file."""
    beir = None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if beir is None:  # the first content line tells the format, as Qrels.read does
                beir = [c.strip() for c in line.split("\t")] == ["query-id", "corpus-id", "score"]
                if beir:
                    continue
            fields = [c.strip() for c in line.split("\t")] if beir else line.split()
            if len(fields) >= 3:
                yield lineno, fields[0], fields[1] if beir else fields[2]


def _unknown_message(
    qrels_path: Path,
    total: int,
    bad_query: list[tuple[str, str]],
    bad_doc: list[tuple[str, str]],
    queries_path: Path,
    corpus: pl.DataFrame,
) -> str:
    """The error for judgements naming unknown ids: counts, then the first lines of each kind."""
    wanted = set(bad_query) | set(bad_doc)
    line_of = {(q, d): n for n, q, d in _judgement_lines(qrels_path) if (q, d) in wanted}
    n_docs = corpus.height

    def shown(pairs: list[tuple[str, str]], side: int, what) -> list[str]:
        """The first line of each of the first few distinct offending ids (query: side 0, doc: 1)."""
        first: dict[str, tuple[str, str]] = {}
        for pair in sorted(pairs, key=lambda p: line_of.get(p, 0)):
            first.setdefault(pair[side], pair)
        return [f"{qrels_path}:{line_of.get(p, '?')}: {what(p[side])}" for p in list(first.values())[:SHOWN]]

    parts = []
    if bad_query:
        n_ids = len({q for q, _ in bad_query})
        parts.append(f"{len(bad_query)} judgements of {n_ids} queries with no text in {queries_path}")
    if bad_doc:
        n_ids = len({d for _, d in bad_doc})
        parts.append(f"{len(bad_doc)} judgements of {n_ids} documents not in corpus.jsonl ({n_docs} docs)")
    lines = shown(bad_query, 0, lambda q: f"query {q!r} has no text in {queries_path}") + shown(
        bad_doc, 1, lambda d: f"doc {d!r} is not in corpus.jsonl ({n_docs} documents)"
    )
    return (
        f"{qrels_path}: {' and '.join(parts)} (of {total} judgements): {'; '.join(lines)}; "
        "pass drop_unknown=true to skip them"
    )


def _known_judgements(
    qrels: Qrels,
    qrels_path: Path,
    texts: dict[str, str],
    queries_path: Path,
    corpus: pl.DataFrame,
    drop_unknown: bool,
) -> dict[str, dict[str, int]]:
    """The judgements whose query has a text and whose document is in the corpus.

    Raises:
        TrainingDataError: some do not, and ``drop_unknown`` is False.
    """
    doc_set = set(corpus["doc_id"].to_list())
    bad_query = [(q, d) for q, docs in qrels.items() if q not in texts for d in docs]
    bad_doc = [(q, d) for q, docs in qrels.items() if q in texts for d in docs if d not in doc_set]
    if (bad_query or bad_doc) and not drop_unknown:
        total = qrels.num_pairs()
        raise TrainingDataError(_unknown_message(qrels_path, total, bad_query, bad_doc, queries_path, corpus))
    if bad_query or bad_doc:
        log.warning(
            "%s: dropped %d of %d judgements naming unknown ids: %d judgements of %d queries with no text "
            "in %s, %d judgements of %d documents not in corpus.jsonl",
            qrels_path,
            len(bad_query) + len(bad_doc),
            qrels.num_pairs(),
            len(bad_query),
            len({q for q, _ in bad_query}),
            queries_path,
            len(bad_doc),
            len({d for _, d in bad_doc}),
        )
    return {
        q: {d: label for d, label in docs.items() if d in doc_set} for q, docs in qrels.items() if q in texts
    }


def in_dataset(dataset: BeirData, path: str | Path) -> Path:
    """``path``; a relative one that does not exist names a file in the dataset folder
    (``original/train.2-1-0.qrel``)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else dataset.path / path


def load_training_set(
    dataset: BeirData,
    queries: str | Path | None = None,
    qrels: str | Path | None = None,
    drop_unknown: bool = False,
) -> TrainingSet:
    """Training queries and judgements over ``dataset``'s corpus, checked (see the module doc).

    Args:
        dataset: (BeirData) gives the corpus; and the queries and qrels when those are None
            (load it with ``load_beir(name, split="train")``).
        queries: (str | Path | None) a BEIR ``queries.jsonl`` or ``QID<TAB>text`` file (a relative
            path not found from the working directory is looked up in the dataset folder). Default
            None: ``dataset.queries``, or every query of the dataset's ``queries.jsonl`` when
            ``qrels`` is a file (it may judge queries outside the dataset's split).
        qrels: (str | Path | None) a BEIR TSV or TREC qrels file. Default None: ``dataset.qrels``.
        drop_unknown: (bool) drop judgements whose query has no text or whose document is not
            in the corpus, instead of refusing them. Default False.

    Returns:
        TrainingSet of the queries with at least one positive.

    Raises:
        TrainingDataError: unknown ids (without ``drop_unknown``), a missing file, or no query
            with a positive judgement.
        DataFormatError: a malformed queries or qrels file (file and line in the message).
    """
    if qrels is None:
        qrels_path = dataset.path / "qrels" / f"{dataset.split}.tsv"
        judgements = dataset.qrels
    else:
        qrels_path = in_dataset(dataset, qrels)
        if not qrels_path.is_file():
            raise TrainingDataError(f"{qrels_path}: no such qrels file (train.qrels)")
        judgements = Qrels.read(qrels_path)
    if queries is not None:
        queries_path = in_dataset(dataset, queries)
        texts = read_queries(queries_path)
    elif qrels is None:
        queries_path = dataset.path / "queries.jsonl"
        texts = dict(dataset.queries.select("query_id", "text").iter_rows())
    else:
        queries_path = dataset.path / "queries.jsonl"
        texts = read_queries(queries_path)
    known = _known_judgements(judgements, qrels_path, texts, queries_path, dataset.corpus, drop_unknown)
    kept = {q: docs for q, docs in known.items() if any(label > 0 for label in docs.values())}
    if len(kept) < len(known):
        dropped = len(known) - len(kept)
        log.info("%s: dropped %d of %d queries with no positive judgement", qrels_path, dropped, len(known))
    if not kept:
        raise TrainingDataError(
            f"{qrels_path}: no query with a positive judgement (label > 0) is left "
            f"(of {len(judgements)} judged queries, texts from {queries_path}); nothing to train on"
        )
    training = TrainingSet(
        name=f"{dataset.name}/{qrels_path.stem}",
        corpus=dataset.corpus,
        queries={q: texts[q] for q in kept},
        qrels=Qrels(kept, name=qrels_path.stem),
        dataset_path=dataset.path,
        queries_path=queries_path,
        qrels_path=qrels_path,
    )
    log.info("loaded %r from %s and %s", training, queries_path, qrels_path)
    return training


__all__ = ["TrainingDataError", "TrainingSet", "load_training_set", "read_queries"]
