"""trec_eval-convention metrics: worked examples, conventions, and parity with pytrec_eval."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import pytrec_eval
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.eval.retrieval_evaluator import RetrievalEvaluator
from retrieval.eval.trec import (
    Measure,
    average_precision,
    evaluate,
    judge,
    ndcg_cut,
    parse_measures,
    per_query,
    precision,
    recall,
    recip_rank,
    success,
)
from retrieval.types import Qrels, Run

L2 = math.log2

# ----------------------------------------------------------------------------- worked examples
# Query q: judged d1=3, d2=0, d3=2, d4=1, d5=-1 (judged, never relevant); run ranks
# d2 (0.9), x (0.8, unjudged), d3 (0.7), d5 (0.6), d1 (0.5). Labels by rank: 0 0 2 0 3.
QRELS = Qrels({"q": {"d1": 3, "d2": 0, "d3": 2, "d4": 1, "d5": -1}})
RUN = Run({"q": {"d1": 0.5, "d2": 0.9, "x": 0.8, "d3": 0.7, "d5": 0.6}})


def _judged():
    return judge(RUN["q"], QRELS["q"])


def test_judge_orders_and_labels():
    j = _judged()
    assert j.labels.tolist() == [0, 0, 2, 0, 3]  # d2 x d3 d5(-1 -> 0) d1
    assert j.ideal.tolist() == [3, 2, 1]  # positive labels only, descending
    assert j.num_rel() == 3 and j.num_rel(2) == 2


def test_ndcg_cut_by_hand():
    j = _judged()
    idcg5 = 3 / L2(2) + 2 / L2(3) + 1 / L2(4)  # ideal: all 3 relevant docs, by label
    assert ndcg_cut(j, 5) == pytest.approx((2 / L2(4) + 3 / L2(6)) / idcg5, abs=1e-12)
    assert ndcg_cut(j, 3) == pytest.approx((2 / L2(4)) / idcg5, abs=1e-12)
    assert ndcg_cut(j, 2) == 0.0
    idcg1 = 3.0  # ideal cut at k=1 even though 3 docs are relevant
    assert ndcg_cut(judge({"d3": 1.0}, QRELS["q"]), 1) == pytest.approx(2 / idcg1, abs=1e-12)


def test_recall_precision_success_by_hand():
    j = _judged()
    assert recall(j, 3) == pytest.approx(1 / 3) and recall(j, 5) == pytest.approx(2 / 3)
    assert recall(j, 5, relevance_level=2) == 1.0 and recall(j, 3, relevance_level=3) == 0.0
    assert precision(j, 5) == pytest.approx(2 / 5)
    assert precision(j, 10) == pytest.approx(2 / 10)  # divided by k although only 5 retrieved
    assert success(j, 2) == 0.0 and success(j, 3) == 1.0


def test_recip_rank_and_ap_by_hand():
    j = _judged()
    assert recip_rank(j) == pytest.approx(1 / 3)
    assert recip_rank(j, relevance_level=3) == pytest.approx(1 / 5)
    assert average_precision(j) == pytest.approx((1 / 3 + 2 / 5) / 3)  # divided by R = 3
    assert average_precision(j, 3) == pytest.approx((1 / 3) / 3)  # map_cut: still / R, not / min(k, R)
    assert average_precision(judge({}, QRELS["q"])) == 0.0


def test_per_query_names_and_values():
    out = per_query(RUN, QRELS, ["ndcg_cut.5", "P.5", "recip_rank", "map", "map_cut.3", "success.1"])
    assert list(out["q"]) == ["map", "recip_rank", "P_5", "ndcg_cut_5", "map_cut_3", "success_1"]
    assert out["q"]["P_5"] == pytest.approx(0.4)


def test_query_without_relevant_docs_scores_zero():
    j = judge({"a": 1.0, "b": 0.5}, {"a": 0, "b": -1})
    for value in (ndcg_cut(j, 10), recall(j, 10), precision(j, 10), recip_rank(j), average_precision(j)):
        assert value == 0.0


# ----------------------------------------------------------------------------- conventions
def test_scores_compared_as_float32():
    # 1 + 1e-9 == 1 in float32, so the tie is broken by doc id descending: "b" before "a"
    assert judge({"a": 1.0 + 1e-9, "b": 1.0}, {"a": 1}).labels.tolist() == [0, 1]
    assert judge({"a": 16777217.0, "b": 16777216.0}, {"a": 1}).labels.tolist() == [0, 1]
    # distinct in float32: the score decides
    assert judge({"a": 1.5, "b": 1.0}, {"a": 1}).labels.tolist() == [1, 0]
    assert judge({"a": 0.0, "b": -0.0}, {"a": 1}).labels.tolist() == [0, 1]  # -0.0 ties 0.0


@pytest.mark.parametrize(
    "ids, expected",
    [
        (["a", "b"], ["b", "a"]),
        (["B", "a"], ["a", "B"]),
        (["10", "9"], ["9", "10"]),
        (["z", "é"], ["é", "z"]),
    ],
)
def test_ties_broken_by_doc_id_descending_bytes(ids, expected):
    run = Run({"q": dict.fromkeys(ids, 1.0)})
    assert [d for d, _ in run.ranked("q")] == expected
    first = expected[0]
    assert recip_rank(judge(run["q"], {first: 1})) == 1.0


def test_nan_score_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        judge({"a": float("nan")}, {"a": 1})


def test_complete_averages_over_all_qrels_queries():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}, "empty": {}}
    run = {"q1": {"a": 1.0}, "q3": {"c": 1.0}, "extra": {"z": 1.0}}
    # in both: q1 (1.0) and q3 (0.0); "extra" has no judgements, "empty" is not a query
    assert evaluate(run, qrels, "recip_rank", complete=False) == {"recip_rank": 0.5}
    # -c: q1, q2 (missing from run: 0), q3 -> 1/3
    assert evaluate(run, qrels, "recip_rank", complete=True) == {"recip_rank": pytest.approx(1 / 3)}
    assert list(per_query(run, qrels, "map", complete=True)) == ["q1", "q2", "q3"]


def test_query_with_empty_ranking_counts_as_in_run():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    assert evaluate({"q1": {"a": 1.0}, "q2": {}}, qrels, "P.1", complete=False) == {"P_1": 0.5}


def test_no_query_to_average_raises():
    with pytest.raises(ValueError, match="no quer"):
        evaluate({"x": {"a": 1.0}}, {"q": {"a": 1}}, "map", complete=False)


def test_drop_self_hits():
    qrels = {"q1": {"q1": 1, "d": 1}}
    run = {"q1": {"q1": 2.0, "d": 1.0}}
    assert evaluate(run, qrels, "recip_rank")["recip_rank"] == 1.0
    assert evaluate(run, qrels, "P.1", drop_self_hits=True)["P_1"] == 1.0  # d moves to rank 1
    assert evaluate(run, qrels, "recall.10", drop_self_hits=True)["recall_10"] == 0.5  # qrels untouched


def test_all_negative_labels_score_zero():
    # trec_eval reads stale memory for such a query (pytrec_eval may crash); here it is simply 0
    assert evaluate({"q": {"a": 1.0}}, {"q": {"a": -1}}, ["ndcg_cut.10", "map"]) == {
        "map": 0.0,
        "ndcg_cut_10": 0.0,
    }


def test_parse_measures():
    assert parse_measures(["ndcg_cut.10,5", "recip_rank", "ndcg_cut.5", "map"]) == (
        Measure("map"),
        Measure("recip_rank"),
        Measure("ndcg_cut", 5),
        Measure("ndcg_cut", 10),
    )
    assert [m.cutoff for m in parse_measures("success")] == [1, 5, 10]  # trec_eval's defaults
    assert len(parse_measures("P")) == 9
    assert [m.key for m in parse_measures(["ndcg_cut.10", "recip_rank", "P.5", "map_cut.3"])] == [
        "mrr",
        "precision@5",
        "ndcg@10",
        "map@3",
    ]
    for bad in ["bpref", "map.10", "P.0", "P.x", "P.", "ndcg_cut.-1"]:
        with pytest.raises(ValueError):
            parse_measures(bad)


def test_relevance_level_must_be_positive():
    with pytest.raises(ValueError, match="relevance_level"):
        evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, "map", relevance_level=0)


# ----------------------------------------------------------------------------- evaluator
def test_evaluator_keys_prefix_and_per_query():
    ev = RetrievalEvaluator()
    out = ev(RUN, QRELS, prefix="test")
    assert list(out) == ["test/map", "test/mrr", "test/recall@100", "test/ndcg@10"]
    assert out["test/mrr"] == pytest.approx(1 / 3)
    assert ev(RUN, QRELS, prefix="val/").keys() == ev(RUN, QRELS, prefix="val").keys()
    assert set(ev(RUN, QRELS)) == {"map", "mrr", "recall@100", "ndcg@10"}
    pq = ev.per_query(RUN, QRELS)
    assert pq["q"]["ndcg@10"] == pytest.approx(out["test/ndcg@10"])


def test_evaluator_complete_default_and_options():
    qrels = Qrels({"q1": {"a": 1}, "q2": {"q2": 1, "b": 1}})
    run = Run({"q1": {"a": 1.0}, "q3": {"a": 1.0}})
    assert RetrievalEvaluator(["recip_rank"])(run, qrels) == {"mrr": 0.5}
    assert RetrievalEvaluator(["recip_rank"], complete=False)(run, qrels) == {"mrr": 1.0}
    run2 = Run({"q2": {"q2": 5.0, "b": 1.0}})
    assert RetrievalEvaluator(["P.1"], drop_self_hits=True, complete=False)(run2, qrels) == {
        "precision@1": 1.0
    }
    assert RetrievalEvaluator(["P.1"], relevance_level=2, complete=False)(run2, qrels) == {"precision@1": 0.0}


# ----------------------------------------------------------------------------- parity with pytrec_eval
QIDS = ["q1", "q2", "q10", "Q", "a", "é"]
DOCS = ["d1", "d2", "d10", "D1", "d9", "a", "b", "q1", "Q", "é", "z", "z0", "_", "0", "10", "9"]
LABELS = [-2, -1, 0, 0, 1, 1, 2, 3]
# few distinct values: many ties, float32 ties (1 vs 1+1e-9, 2**24 vs 2**24+1), -0.0, +-inf
SCORES = [0.0, -0.0, 1.0, 1.0 + 1e-9, 2.0, -1.0, 0.5, 16777216.0, 16777217.0, math.inf, -math.inf, 1e-40]
SPECS = ["ndcg_cut.1,3,5,10,20", "recall.1,3,5,10", "P.1,3,5,10", "recip_rank", "map", "map_cut.1,3,10",
         "success.1,3,10"]  # fmt: skip
# trec_eval's -c scores a query missing from the run with this one-document ranking
BOGUS = {"ceci_nest_pas_un_docno": 1.0}
TOL = 1e-9  # measured: bit-identical over 20k random cases; the brief asks for 1e-6


def _judgements():
    # trec_eval reads uninitialised memory when every label of a query is negative
    # (see test_all_negative_labels_score_zero), so each drawn query has a label >= 0
    return st.dictionaries(st.sampled_from(DOCS), st.sampled_from(LABELS), min_size=1, max_size=8).filter(
        lambda d: max(d.values()) >= 0
    )


cases = st.fixed_dictionaries(
    {
        "qrels": st.dictionaries(st.sampled_from(QIDS), _judgements(), min_size=1, max_size=4),
        "run": st.dictionaries(
            st.sampled_from(QIDS),
            st.dictionaries(st.sampled_from(DOCS), st.sampled_from(SCORES), max_size=14),
            max_size=5,
        ),
        "relevance_level": st.sampled_from([1, 2]),
        "drop_self_hits": st.booleans(),
    }
)


@settings(
    max_examples=int(os.environ.get("SPARROW_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases)
def test_parity_with_pytrec_eval(case):
    qrels, run = case["qrels"], case["run"]
    rl, drop = case["relevance_level"], case["drop_self_hits"]
    ref_run = {q: {d: s for d, s in docs.items() if not (drop and d == q)} for q, docs in run.items()}
    for complete in (False, True):
        if complete:
            ref_run = {**{q: BOGUS for q in qrels}, **ref_run}
        ref = pytrec_eval.RelevanceEvaluator(qrels, set(SPECS), relevance_level=rl).evaluate(ref_run)
        ours = per_query(run, qrels, SPECS, complete=complete, drop_self_hits=drop, relevance_level=rl)
        assert set(ours) == set(ref)
        for q, values in ref.items():
            assert set(values) == set(ours[q])
            for name, v in values.items():
                assert abs(ours[q][name] - v) <= TOL, (q, name, ours[q][name], v)
        if not ref:
            with pytest.raises(ValueError):
                evaluate(run, qrels, SPECS, complete=complete, drop_self_hits=drop, relevance_level=rl)
            continue
        means = evaluate(run, qrels, SPECS, complete=complete, drop_self_hits=drop, relevance_level=rl)
        n = len(qrels) if complete else sum(1 for q in run if q in qrels)
        assert len(ref) == n
        for name in means:
            assert abs(means[name] - sum(ref[q][name] for q in ref) / n) <= TOL


def test_parity_large_rankings():
    """Long rankings with continuous and coarse scores, deep cut-offs (one fixed seed)."""
    rng = np.random.default_rng(0)
    qrels, run = {}, {}
    for i in range(40):
        docs = [f"doc{j}" for j in rng.choice(3000, size=1200, replace=False)]
        coarse = i % 2 == 0
        scores = np.round(rng.normal(size=1000), 1) if coarse else rng.normal(size=1000)
        run[f"q{i}"] = dict(zip(docs[:1000], scores.tolist(), strict=True))
        judged = rng.choice(docs, size=60, replace=False)
        qrels[f"q{i}"] = {d: int(rng.choice([-1, 0, 0, 1, 2, 3])) for d in judged}
    specs = ["ndcg_cut.10,100,1000", "recall.100,1000", "P.10,1000", "recip_rank", "map", "map_cut.100"]
    ref = pytrec_eval.RelevanceEvaluator(qrels, set(specs)).evaluate(run)
    ours = per_query(run, qrels, specs)
    for q in ref:
        for name, v in ref[q].items():
            assert abs(ours[q][name] - v) <= TOL


def test_speed_thousands_of_queries():
    rng = np.random.default_rng(1)
    n_q, depth = 1000, 1000
    ids = np.array([f"doc{j}" for j in range(20000)])
    run, qrels = {}, {}
    for i in range(n_q):
        pick = ids[rng.choice(20000, size=depth, replace=False)].tolist()
        run[str(i)] = dict(zip(pick, rng.random(depth).tolist(), strict=True))
        qrels[str(i)] = {d: 1 for d in pick[:: depth // 10]}
    start = time.perf_counter()
    evaluate(run, qrels, ["ndcg_cut.10", "recall.100", "recip_rank", "map"])
    assert time.perf_counter() - start < 15.0  # ~2 s on one core
