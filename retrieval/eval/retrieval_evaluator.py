"""A callable retrieval evaluator returning flat, prefixed metric dicts (trec_eval conventions).

Example::

    evaluator = RetrievalEvaluator()            # ndcg@10, recall@100, mrr, map; -c averaging
    evaluator(run, qrels, prefix="test")        # {"test/ndcg@10": 0.41, "test/mrr": ..., ...}
    evaluator.per_query(run, qrels)             # {"q1": {"ndcg@10": 0.5, ...}, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from retrieval.eval.trec import Measure, mean, parse_measures
from retrieval.eval.trec import per_query as _trec_per_query
from retrieval.types import Qrels, Run

log = logging.getLogger(__name__)


class RetrievalEvaluator:
    """Means of trec_eval measures over a :class:`~retrieval.types.Run` and :class:`~retrieval.types.Qrels`.

    Every convention is that of :mod:`retrieval.eval.trec` (and ``trec_eval``/pytrec_eval):
    scores compared as float32, ties broken by doc id in descending byte order, gain = the
    label, ideal DCG from all judged relevant documents, unjudged = non-relevant, and with
    ``complete=True`` (Sparrow's default, ``trec_eval -c``) every qrels query counts,
    scoring 0 when the run misses it.

    Args:
        measures: (Iterable[str], default ``("ndcg_cut.10", "recall.100", "recip_rank", "map")``)
            trec_eval measure specs; comma lists like ``"ndcg_cut.5,10"`` are allowed.
        complete: (bool, default True) average over every qrels query (``-c``); False: over
            the queries in both run and qrels (trec_eval's default).
        drop_self_hits: (bool, default False) BEIR's convention: ignore retrieved documents
            whose id equals the query id.
        relevance_level: (int, default 1) minimum label of a relevant document (``-l``).

    Keys of the returned dicts: ``ndcg_cut.k -> "ndcg@k"``, ``recall.k -> "recall@k"``,
    ``P.k -> "precision@k"``, ``recip_rank -> "mrr"``, ``map -> "map"``,
    ``map_cut.k -> "map@k"``, ``success.k -> "success@k"``.
    """

    def __init__(
        self,
        measures: Iterable[str] = ("ndcg_cut.10", "recall.100", "recip_rank", "map"),
        complete: bool = True,
        drop_self_hits: bool = False,
        relevance_level: int = 1,
    ):
        if isinstance(measures, str):
            measures = [measures]
        self.measures: tuple[Measure, ...] = parse_measures(list(measures))
        if relevance_level < 1:
            raise ValueError(f"relevance_level must be >= 1, got {relevance_level}")
        self.complete = complete
        self.drop_self_hits = drop_self_hits
        self.relevance_level = relevance_level

    def per_query(self, run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
        """``{qid: {"ndcg@10": value, ...}}`` for every evaluated query, in byte order of ids."""
        values = _trec_per_query(
            run,
            qrels,
            self.measures,
            complete=self.complete,
            drop_self_hits=self.drop_self_hits,
            relevance_level=self.relevance_level,
        )
        keys = [(m.trec_name, m.key) for m in self.measures]
        return {qid: {key: v[name] for name, key in keys} for qid, v in values.items()}

    def __call__(self, run: Run, qrels: Qrels, prefix: str = "") -> dict[str, float]:
        """The means, ``{prefix/key: value}``.

        Args:
            run: the ranking to evaluate.
            qrels: the judgements.
            prefix: (str, default "") prepended as ``"prefix/"`` (e.g. ``"test"`` gives
                ``"test/ndcg@10"``); a prefix already ending in ``/`` is used as is.

        Raises:
            ValueError: no query to average (see :func:`retrieval.eval.trec.evaluate`).
        """
        means = mean(self.per_query(run, qrels))
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out = {f"{prefix}{key}": value for key, value in means.items()}
        log.debug("evaluated %s: %s", getattr(run, "name", ""), out)
        return out

    def __repr__(self) -> str:
        names = ", ".join(m.trec_name for m in self.measures)
        return (
            f"RetrievalEvaluator(measures=[{names}], complete={self.complete}, "
            f"drop_self_hits={self.drop_self_hits}, relevance_level={self.relevance_level})"
        )
