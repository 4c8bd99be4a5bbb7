"""How good are the distillation targets? Each teacher, and their ensembles, re-ranking BM25's top 100.

    python -m retrieval.teachers dataset.name=nfcorpus dataset.split=dev depth=100 out=/tmp/nf_dev.parquet
    python benchmarks/teacher_ensemble.py /tmp/nf_dev.parquet nfcorpus dev

For every judged query of the split, the candidates of the teacher file that BM25 retrieved
(``bm25_rank`` set: its top ``depth``) are ordered by one teacher's score, or by the ensemble
of several (:func:`retrieval.losses.ensemble_teacher_scores`: min-max per query, average, x 30,
as training uses it), and evaluated with trec_eval conventions (NDCG@10, ``-c``). Baseline:
BM25's own order, in the same run. Positives outside BM25's list are not candidates here, so
the ensemble cannot profit from the file including them.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import cpu_model, publish  # noqa: E402

from retrieval.data.beir import load_beir  # noqa: E402
from retrieval.data.teacher_scores import teacher_columns  # noqa: E402
from retrieval.eval.retrieval_evaluator import RetrievalEvaluator  # noqa: E402
from retrieval.losses import ensemble_teacher_scores  # noqa: E402
from retrieval.types import Run  # noqa: E402

COMBINATIONS = (("bm25", "dense", "splade"), ("bm25", "dense"), ("bm25", "splade"), ("dense", "splade"))


def reranked(groups: list[tuple[str, pl.DataFrame]], teachers: tuple[str, ...]) -> Run:
    """Each query's candidates scored by the ensemble of ``teachers`` (one teacher: its score)."""
    out = {}
    for qid, g in groups:
        scores = [torch.tensor(g[t].to_numpy(), dtype=torch.float32)[None] for t in teachers]  # (1, C) each
        combined = scores[0][0] if len(teachers) == 1 else ensemble_teacher_scores(scores, None, 30.0)[0]
        out[qid] = dict(zip(g["doc_id"].to_list(), combined.tolist(), strict=True))
    return Run(out)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python benchmarks/teacher_ensemble.py TEACHER_FILE DATASET SPLIT")
    path, dataset, split = sys.argv[1:]
    data = load_beir(dataset, split=split)
    frame = pl.read_parquet(path).filter(pl.col("bm25_rank").is_not_null())
    groups = [(q, g) for (q,), g in frame.group_by(["query_id"], maintain_order=True)]
    present = teacher_columns(frame)
    rows = [(t,) for t in present] + [c for c in COMBINATIONS if set(c) <= set(present)]
    evaluator = RetrievalEvaluator(measures=["ndcg_cut.10"], drop_self_hits=True)
    ndcg = {c: evaluator(reranked(groups, c), data.qrels)["ndcg@10"] for c in rows}
    base = ndcg[("bm25",)]
    lines = [
        f"## Teacher ensemble re-ranking BM25's top 100: {dataset} {split} - {dt.date.today()}",
        "",
        f"Machine: {cpu_model()}. {len(groups)} queries. "
        f"Command: `python benchmarks/teacher_ensemble.py {path} {dataset} {split}`",
        "",
        "| order | NDCG@10 | vs BM25 |",
        "|---|---:|---:|",
        *[f"| {' + '.join(c)} | {v:.4f} | {v - base:+.4f} |" for c, v in ndcg.items()],
    ]
    publish("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
