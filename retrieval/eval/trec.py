"""Ranking metrics with trec_eval's conventions, computed per query from a Run and Qrels.

These reproduce ``trec_eval`` 9.x as bundled by pytrec_eval (``pytrec_eval-terrier`` 0.5.11):
a property-based test compares every measure, per query and averaged, with and without
``complete`` (``tests/retrieval/eval/test_trec_metrics.py``); over 40k random cases the
values were bit-identical.

Conventions (what every number here means):

* **Ranking** (:func:`retrieval.types.trec_order`): a query's documents are sorted by score
  descending, the scores compared **as float32**; ties (including scores that only differ
  beyond float32 precision, and ``-0.0`` vs ``0.0``) are broken by doc id in **descending**
  byte order (``strcmp``). The rank column of a run file is ignored. (pytrec_eval stores
  scores as C ``float``; the current trec_eval sources store ``double``, so a recent
  trec_eval binary can order scores closer than float32 precision differently.)
* **Judgements**: a retrieved document missing from the qrels is unjudged and counts as
  non-relevant. A document is *relevant* when its label is ``>= relevance_level``
  (default 1, trec_eval's ``-l``; values < 1 are refused). Judged documents with label
  ``< 0`` are non-relevant everywhere and are left out of the ideal ranking (trec_eval's
  "in pool but unjudged"); a query whose labels are all negative scores 0 (trec_eval reads
  uninitialised memory for it and pytrec_eval can crash).
* **Measures** (``k`` a positive cut-off; ``R`` = number of relevant judged documents of
  the query, retrieved or not; ``rel_i`` = 1 if the document at rank ``i`` is relevant):

  - ``ndcg_cut.k``: ``DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k} g_i / log2(i + 1)``, gain
    ``g_i`` = the label when positive, else 0 (``relevance_level`` plays no part); the ideal
    ranking holds **all** judged documents with a positive label, sorted by label
    descending, cut at ``k``. 0 when the query has no positive label.
  - ``recall.k``: ``sum_{i<=k} rel_i / R``; 0 when ``R = 0``.
  - ``P.k``: ``sum_{i<=k} rel_i / k`` -- divided by ``k`` even when fewer than ``k``
    documents were retrieved.
  - ``recip_rank``: ``1 / i`` for the first relevant rank ``i`` over the whole ranking, else 0.
  - ``map``: average precision over the whole ranking, ``sum_i rel_i * P@i / R``; 0 when ``R = 0``.
  - ``map_cut.k``: the same sum stopped at rank ``k``, still divided by ``R`` (not ``min(k, R)``).
  - ``success.k``: 1 if a relevant document is in the top ``k``, else 0 (Hit@k).

* **Which queries are averaged**: a query with no judgements at all is not a query. With
  ``complete=False`` (trec_eval's default) the mean is over the queries that are in both
  the run and the qrels; with ``complete=True`` (trec_eval ``-c``; Sparrow's default) it is
  over every qrels query, and a query missing from the run scores 0 on every measure here.
  Run queries that are not in the qrels are ignored in both modes. A run query whose ranking
  is empty is "in the run" (as in pytrec_eval) and scores 0.
* **BEIR**: ``drop_self_hits=True`` removes every retrieved document whose id equals the
  query id before ranking (BEIR's ``ignore_identical_ids``); qrels are left as they are.

Sums run in rank order, as in trec_eval, and means add queries in byte order of their ids.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from retrieval.types import Qrels, Run, trec_order

log = logging.getLogger(__name__)

# trec_eval's measure families in its print order, with each one's default cut-offs (None: no cut-off)
_TREC_CUTOFFS = (5, 10, 15, 20, 30, 100, 200, 500, 1000)
FAMILIES: dict[str, tuple[int, ...] | None] = {
    "map": None,
    "recip_rank": None,
    "P": _TREC_CUTOFFS,
    "recall": _TREC_CUTOFFS,
    "ndcg_cut": _TREC_CUTOFFS,
    "map_cut": _TREC_CUTOFFS,
    "success": (1, 5, 10),
}
# Sparrow's flat report keys: "ndcg_cut.10" -> "ndcg@10", "recip_rank" -> "mrr"
_KEYS = {
    "map": "map",
    "recip_rank": "mrr",
    "P": "precision",
    "recall": "recall",
    "ndcg_cut": "ndcg",
    "map_cut": "map",
    "success": "success",
}


@dataclass(frozen=True)
class Measure:
    """One measure: a trec_eval family and, for cut-off families, the cut-off ``k``.

    Attributes:
        family: (str) one of :data:`FAMILIES`: ``map``, ``recip_rank``, ``P``, ``recall``,
            ``ndcg_cut``, ``map_cut``, ``success``.
        cutoff: (int | None) ``k`` for cut-off families, ``None`` for ``map`` and ``recip_rank``.
    """

    family: str
    cutoff: int | None = None

    @property
    def trec_name(self) -> str:
        """The name trec_eval prints: ``ndcg_cut_10``, ``P_5``, ``recip_rank``."""
        return self.family if self.cutoff is None else f"{self.family}_{self.cutoff}"

    @property
    def key(self) -> str:
        """Sparrow's report key: ``ndcg@10``, ``recall@100``, ``precision@5``, ``mrr``, ``map@10``."""
        base = _KEYS[self.family]
        return base if self.cutoff is None else f"{base}@{self.cutoff}"

    def _sort_key(self) -> tuple[int, int]:
        return list(FAMILIES).index(self.family), self.cutoff or 0


def parse_measures(specs: str | Iterable[str]) -> tuple[Measure, ...]:
    """Parse trec_eval measure specs (``-m`` arguments) into :class:`Measure` s.

    ``"ndcg_cut.5,10"`` gives ``ndcg_cut_5`` and ``ndcg_cut_10``; a cut-off family without
    parameters (``"P"``) gets trec_eval's default cut-offs. Specs for the same family are
    merged (trec_eval would keep only the first one's cut-offs).

    Returns:
        The measures without duplicates, in trec_eval's print order (family order of
        :data:`FAMILIES`, then increasing cut-off).

    Raises:
        ValueError: an unknown family, a cut-off on ``map``/``recip_rank``, or a cut-off that
            is not a positive integer.
    """
    if isinstance(specs, str):
        specs = [specs]
    found: set[Measure] = set()
    for spec in specs:
        family, dot, params = spec.strip().partition(".")
        if family not in FAMILIES:
            raise ValueError(f"unknown measure {spec!r}; supported: {', '.join(FAMILIES)}")
        defaults = FAMILIES[family]
        if defaults is None:
            if dot:
                raise ValueError(f"measure {family!r} takes no cut-off, got {spec!r}")
            found.add(Measure(family))
            continue
        if dot and not params:
            raise ValueError(f"measure {spec!r} has an empty cut-off list")
        for p in params.split(",") if dot else defaults:
            if not re.fullmatch(r"[0-9]+", str(p).strip()) or int(p) <= 0:
                raise ValueError(f"cut-offs must be positive integers, got {p!r} in {spec!r}")
            found.add(Measure(family, int(p)))
    return tuple(sorted(found, key=Measure._sort_key))


@dataclass(frozen=True)
class Judged:
    """One query's ranking joined with its judgements (trec_eval's ``RES_RELS``).

    Attributes:
        labels: (n_ret,) int64 label of the document at rank ``i + 1``; 0 for unjudged
            documents and for judged labels <= 0.
        ideal: (n_pos,) int64 the positive labels of all judged documents, descending.
    """

    labels: np.ndarray
    ideal: np.ndarray

    def num_rel(self, relevance_level: int = 1) -> int:
        """R: judged documents with label >= ``relevance_level``, retrieved or not."""
        return int(np.count_nonzero(self.ideal >= relevance_level))


def judge(
    scores: Mapping[str, float], judgements: Mapping[str, int], *, drop_id: str | None = None
) -> Judged:
    """Rank one query's documents the trec_eval way and look up their labels.

    Args:
        scores: ``{doc id: score}`` of the query (may be empty).
        judgements: ``{doc id: label}`` of the query.
        drop_id: a doc id to remove before ranking (BEIR: the query's own id), or None.

    Returns:
        The :class:`Judged` ranking.

    Raises:
        ValueError: a NaN score.
    """
    ids = [d for d in scores if d != drop_id] if drop_id is not None and drop_id in scores else list(scores)
    n = len(ids)
    if n:
        values = np.fromiter((scores[d] for d in ids), dtype=np.float64, count=n)  # (n,)
        order = trec_order(ids, values).tolist()  # (n,) rank -> index into ids
        labels = np.fromiter((judgements.get(ids[i], 0) for i in order), dtype=np.int64, count=n)
        np.maximum(labels, 0, out=labels)  # (n,) negative labels are non-relevant
    else:
        labels = np.zeros(0, dtype=np.int64)
    pos = np.fromiter((v for v in judgements.values() if v > 0), dtype=np.int64)  # (n_pos,)
    return Judged(labels=labels, ideal=-np.sort(-pos))


def _check_level(relevance_level: int) -> None:
    if relevance_level < 1:
        raise ValueError(f"relevance_level must be >= 1, got {relevance_level}")


def _discounted_sum(gains: np.ndarray) -> float:
    """``sum_i gains[i] / log2(i + 2)``, added in rank order as trec_eval does."""
    if gains.size == 0:
        return 0.0
    terms = gains.astype(np.float64) / np.log2(np.arange(2, gains.size + 2, dtype=np.float64))  # (n,)
    return float(np.cumsum(terms)[-1])


def ndcg_cut(judged: Judged, k: int) -> float:
    """trec_eval ``ndcg_cut.k``: DCG@k over IDCG@k from all positive judged labels (see module doc)."""
    idcg = _discounted_sum(judged.ideal[:k])
    dcg = _discounted_sum(judged.labels[:k])
    return dcg / idcg if idcg > 0.0 else 0.0


def recall(judged: Judged, k: int, relevance_level: int = 1) -> float:
    """trec_eval ``recall.k``: relevant in the top ``k`` / R; 0 when R = 0."""
    _check_level(relevance_level)
    r = judged.num_rel(relevance_level)
    return int(np.count_nonzero(judged.labels[:k] >= relevance_level)) / r if r else 0.0


def precision(judged: Judged, k: int, relevance_level: int = 1) -> float:
    """trec_eval ``P.k``: relevant in the top ``k`` / k (always k, even if fewer retrieved)."""
    _check_level(relevance_level)
    return int(np.count_nonzero(judged.labels[:k] >= relevance_level)) / k


def recip_rank(judged: Judged, relevance_level: int = 1) -> float:
    """trec_eval ``recip_rank`` (MRR per query): 1 / rank of the first relevant document, else 0."""
    _check_level(relevance_level)
    hits = np.flatnonzero(judged.labels >= relevance_level)
    return 1.0 / (int(hits[0]) + 1) if hits.size else 0.0


def average_precision(judged: Judged, k: int | None = None, relevance_level: int = 1) -> float:
    """trec_eval ``map`` (``k=None``) or ``map_cut.k``: ``sum_{i<=k} rel_i * P@i / R``; 0 when R = 0."""
    _check_level(relevance_level)
    r = judged.num_rel(relevance_level)
    if r == 0:
        return 0.0
    ranks = np.flatnonzero(judged.labels[:k] >= relevance_level)  # (h,) 0-based ranks of relevant docs
    if ranks.size == 0:
        return 0.0
    precisions = np.arange(1, ranks.size + 1, dtype=np.float64) / (ranks + 1).astype(np.float64)  # (h,)
    return float(np.cumsum(precisions)[-1]) / r


def success(judged: Judged, k: int, relevance_level: int = 1) -> float:
    """trec_eval ``success.k`` (Hit@k): 1.0 if a relevant document is in the top ``k``, else 0.0."""
    _check_level(relevance_level)
    return 1.0 if bool(np.any(judged.labels[:k] >= relevance_level)) else 0.0


def query_values(judged: Judged, measures: Iterable[Measure], relevance_level: int = 1) -> list[float]:
    """The value of each measure for one judged query, in the order given."""
    out = []
    for m in measures:
        k = m.cutoff
        if m.family == "ndcg_cut":
            out.append(ndcg_cut(judged, k))
        elif m.family == "recall":
            out.append(recall(judged, k, relevance_level))
        elif m.family == "P":
            out.append(precision(judged, k, relevance_level))
        elif m.family == "recip_rank":
            out.append(recip_rank(judged, relevance_level))
        elif m.family in ("map", "map_cut"):
            out.append(average_precision(judged, k, relevance_level))
        elif m.family == "success":
            out.append(success(judged, k, relevance_level))
        else:  # Measure objects built by hand
            raise ValueError(f"unknown measure family {m.family!r}")
    return out


def _as_measures(measures: str | Iterable[str | Measure]) -> tuple[Measure, ...]:
    if isinstance(measures, str):
        measures = [measures]
    measures = list(measures)
    given = {m for m in measures if isinstance(m, Measure)}
    return tuple(
        sorted(
            given | set(parse_measures([m for m in measures if not isinstance(m, Measure)])),
            key=Measure._sort_key,
        )
    )


def evaluated_queries(
    run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], *, complete: bool = True
) -> list[str]:
    """The query ids that are averaged, in byte order (trec_eval's order).

    ``complete=True``: every qrels query with at least one judgement; ``False``: those that are
    also in the run.
    """
    qids = [q for q, docs in qrels.items() if len(docs) > 0 and (complete or q in run)]
    return sorted(qids, key=lambda q: q.encode("utf-8"))


def per_query(
    run: Run | Mapping[str, Mapping[str, float]],
    qrels: Qrels | Mapping[str, Mapping[str, int]],
    measures: str | Iterable[str | Measure],
    *,
    complete: bool = True,
    drop_self_hits: bool = False,
    relevance_level: int = 1,
) -> dict[str, dict[str, float]]:
    """Every measure for every evaluated query.

    Args:
        run: ``{qid: {doc id: score}}``.
        qrels: ``{qid: {doc id: label}}``.
        measures: trec_eval specs (``"ndcg_cut.10"``, ``"P.5,10"``, ``"recip_rank"``) or :class:`Measure` s.
        complete: (bool, default True) also score the qrels queries missing from the run (as
            0), like ``trec_eval -c``; False: only queries in both.
        drop_self_hits: (bool, default False) BEIR: drop retrieved docs whose id is the query id.
        relevance_level: (int, default 1) minimum label of a relevant document (trec_eval ``-l``).

    Returns:
        ``{qid: {trec_name: value}}``, queries in byte order of their ids, measures in
        trec_eval's print order.
    """
    _check_level(relevance_level)
    ms = _as_measures(measures)
    qids = evaluated_queries(run, qrels, complete=complete)
    ignored = sum(1 for q in run if q not in qrels or not len(qrels[q]))
    if ignored:
        log.debug("%d run queries have no judgements and are ignored", ignored)
    empty: dict[str, float] = {}
    out: dict[str, dict[str, float]] = {}
    for qid in qids:
        judged = judge(run.get(qid, empty), qrels[qid], drop_id=qid if drop_self_hits else None)
        values = query_values(judged, ms, relevance_level)
        out[qid] = {m.trec_name: v for m, v in zip(ms, values, strict=True)}
    return out


def mean(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Average per-query values (as from :func:`per_query`) over all their queries.

    Values are added in the order of ``values`` (byte order of query ids from
    :func:`per_query`), then divided by the number of queries, as trec_eval does.

    Raises:
        ValueError: no queries.
    """
    if not values:
        raise ValueError("no queries to average: no query has both results and judgements")
    names = list(next(iter(values.values())))
    totals = dict.fromkeys(names, 0.0)
    for v in values.values():
        for name in names:
            totals[name] += v[name]
    return {name: total / len(values) for name, total in totals.items()}


def evaluate(
    run: Run | Mapping[str, Mapping[str, float]],
    qrels: Qrels | Mapping[str, Mapping[str, int]],
    measures: str | Iterable[str | Measure],
    *,
    complete: bool = True,
    drop_self_hits: bool = False,
    relevance_level: int = 1,
) -> dict[str, float]:
    """Means of the measures, as trec_eval's ``all`` lines: ``{trec_name: mean}``.

    Arguments as in :func:`per_query` (``complete=True`` is ``trec_eval -c``).

    Raises:
        ValueError: no query to average (no qrels query, or none in the run when
            ``complete=False``).
    """
    return mean(
        per_query(
            run,
            qrels,
            measures,
            complete=complete,
            drop_self_hits=drop_self_hits,
            relevance_level=relevance_level,
        )
    )
