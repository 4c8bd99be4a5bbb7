"""Evaluate a retriever on a BEIR-format directory in one line.

    python -m retrieval.evaluate dataset.path=DIR index=bm25
    python -m retrieval.evaluate dataset.name=scifact index=impact               # SPLADE, siamese
    python -m retrieval.evaluate dataset.name=scifact index=impact index.query=idf   # inference-free
    python -m retrieval.evaluate dataset.name=nfcorpus index=faiss               # MiniLM + faiss

Builds the index when it is missing, searches every query of the split, and evaluates with the
shared harness (trec_eval conventions: ``-c`` averaging over every judged query; documents whose
id equals the query id dropped, as BEIR does). Reports NDCG@10, Recall@100, Recall@1000, MRR@10
(reciprocal rank within each ranking cut at 10), per-query latency (median and p99, one query
per call with its encoding, after warm-up), index size and, for sparse indexes, the average
non-zeros per document and query and FLOPS. Writes ``run.trec``, ``metrics.json`` and
``report.md`` into the run folder (``outputs/retrieval_evaluate/<timestamp>``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from retrieval.cli import entry_point
from retrieval.eval.report import metrics_table, write_report
from retrieval.eval.retrieval_evaluator import RetrievalEvaluator
from retrieval.pipeline import (
    directory_size,
    ensure_index,
    load_dataset,
    open_search,
    query_latency,
    search_all,
    sparsity,
    truncate,
    write_run,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Index (if needed), search, evaluate, report; returns the flat metrics."""
    data = load_dataset(cfg)
    index_dir, manifest, build_s = ensure_index(cfg, data)
    search, info = open_search(cfg, index_dir, manifest, data)
    start = time.perf_counter()
    result = search_all(search, data, cfg.k, cfg.batch_size)
    search_s = time.perf_counter() - start
    out_dir = Path(cfg.paths.output_dir)
    write_run(result, out_dir / "run.trec", tag=f"sparrow-{cfg.index.kind}")

    evaluator = RetrievalEvaluator(measures=list(cfg.measures), drop_self_hits=cfg.drop_self_hits)
    metrics = evaluator(result, data.qrels)
    k = cfg.mrr_cutoff
    mrr = RetrievalEvaluator(measures=["recip_rank"])(truncate(result, k, cfg.drop_self_hits), data.qrels)
    metrics[f"mrr@{k}"] = mrr["mrr"]
    figures = query_latency(search, data, cfg.k, cfg.latency_queries)
    figures["index_mb"] = directory_size(index_dir) / 2**20
    if "encode" in info:  # sparse: how many terms queries and documents activate
        figures.update(sparsity(manifest, info["encode"](data.queries["text"].to_list(), progress=False)))
    stage = {**metrics, **figures}
    protocol = {
        "dataset": f"{data.name} ({data.path}), split {data.split}: {data.num_docs} documents, "
        f"{len(data.queries)} queries, {data.qrels.num_pairs()} judgements",
        "index": f"{cfg.index.kind} at {index_dir} (built by Sparrow {manifest.sparrow_version}; "
        f"document encoder {manifest.encoder}; tokenizer {manifest.tokenizer}"
        + (f"; weights x{manifest.quantization_scale:g}, rounded" if manifest.quantization_scale else "")
        + ")",
        "query side": info["query encoder"],
        "metrics": "trec_eval conventions, -c (every judged query counts), graded gains, "
        f"self hits dropped: {cfg.drop_self_hits}; MRR@{k} = recip_rank over each ranking cut at {k}",
        "latency": f"one query per call, encoding included, median and p99 over "
        f"{figures['latency_queries']} queries after 10 warm-up calls",
    }
    timings = {"build": build_s, "search": search_s}
    query_side = f" ({cfg.index.query} queries)" if "query" in cfg.index else ""
    title = f"{cfg.index.kind} on {data.name}{query_side}"
    write_report(out_dir, title, {"test": stage}, protocol, timings, OmegaConf.to_yaml(cfg, resolve=True))
    log.info("results (%s):\n%s", title, metrics_table({"test": stage}))
    return stage


main = entry_point("retrieval_evaluate", run)

if __name__ == "__main__":
    main()
