"""Hard negatives and teacher scores for every training query, precomputed once into one parquet file.

Geng, Luo, Soni, et al., *Towards Competitive Search Relevance For Inference-Free Learned Sparse
Retrievers*, 2024, https://arxiv.org/abs/2411.04403 -- heterogeneous ensemble distillation: a
sparse student learns from several teachers of different kinds, each teacher's scores min-max
normalised per query before they are combined. This job computes what that needs, so that
training never waits on a teacher:

    python -m retrieval.teachers dataset.name=scifact dataset.split=train
    python -m retrieval.teachers dataset.name=nfcorpus dataset.split=dev drop_unknown=true \\
        train.queries=$SPARROW_DATA_DIR/nfcorpus/original/train.titles.queries \\
        train.qrels=$SPARROW_DATA_DIR/nfcorpus/original/train.2-1-0.qrel

**Candidates** of a query ``q``: its positives (label > 0), plus the top ``depth`` documents of
each mining index -- BM25 (``models.bm25``, a Lucene index) and dense (``models.dense``, MiniLM in
faiss) -- both built under ``<paths.indexes_dir>/<dataset>/`` when missing, exactly as
``python -m retrieval.index`` builds them. Documents whose id is the query id (self hits) are
left out of the mined lists (BEIR's rule); ``bm25_rank`` and ``dense_rank`` are 1-based ranks in
those lists, null when the document is not in that list's top ``depth``.

**Teacher scores** of every candidate ``d``, one float32 column per teacher in ``teachers``:

* ``bm25``: the Lucene BM25 score of the searcher (:class:`retrieval.index.bm25.BM25Searcher`),
  from one search of depth ``bm25_depth``. A candidate outside the retrieved list gets a floor:
  the query's lowest retrieved score when the list was cut at ``bm25_depth`` (the candidate's
  true score is at most that), else 0 (Lucene retrieves every document sharing a term with the
  query, so the others score exactly 0). Either way it is the query's minimum, i.e. 0 after
  per-query min-max normalisation.
* ``dense``: :math:`s(q, d) = \\langle E(q), E(d) \\rangle`, the exact dot product of the
  normalised MiniLM embeddings (:class:`~retrieval.encoders.dense.DenseEncoder`). Document
  embeddings come from the pipeline's encoding cache (:func:`retrieval.pipeline.encoding_cache`),
  so the faiss build's encodings are reused.
* ``splade``: :math:`s(q, d) = \\sum_j w_j(q)\\, w_j(d)`, the exact dot product of siamese
  :class:`~retrieval.encoders.splade.SpladeEncoder` vectors (``models.splade``: splade-tiny by
  default). Document vectors come from the same cache as the sparse indexes', so a built
  ``impact``/``sparse_torch`` index's encoding is reused (with the same ``shard_size``).

Each teacher's model is the ``encoder`` section of an index config (``conf/index/*.yaml``),
composed into ``models.<teacher>`` by the config's defaults list, so ``models.dense.encoder.model=DIR``
or ``models.splade.encoder.model=DIR`` picks another one.

**Output**: ``out`` (default ``<paths.indexes_dir>/<dataset>/teachers/<name>.parquet``, ``name``
defaulting to the qrels file's stem), written atomically, with columns ``query_id`` (str),
``doc_id`` (str), ``label`` (int32, the judged label, 0 when not judged), ``bm25_rank`` and
``dense_rank`` (int32, nullable) and one float32 column per teacher; rows sorted by query id,
then doc id. Beside it ``<out>.json`` records the teachers, their models (name and checksum),
the dataset and training files, the depths, the counts, the miners' recall, Sparrow's version
and the creation time. :func:`retrieval.data.teacher_scores.read_teacher_scores` is the reader training uses.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from retrieval.cli import ConfigError, entry_point
from retrieval.data.beir import document_texts
from retrieval.data.teacher_scores import TEACHER_COLUMNS, check_teacher_scores
from retrieval.data.training import TrainingSet, load_training_set
from retrieval.eval.report import atomic_write_text
from retrieval.index.manifest import sparrow_version
from retrieval.pipeline import (
    SearchFn,
    encoding_cache,
    ensure_index,
    index_dir_of,
    load_dataset,
    open_search,
)
from retrieval.types import Run

log = logging.getLogger(__name__)

MINERS = {"bm25": "bm25", "dense": "dense"}  # mining list -> its ``models.<name>`` index section
RANK_COLUMNS = tuple(f"{miner}_rank" for miner in MINERS)
PAIR_CHUNK = 32768  # (query, doc) pairs scored at once


# --------------------------------------------------------------------------- config


def _check_cfg(cfg: DictConfig) -> list[str]:
    """The configured teachers, after checking the fields this job reads."""
    teachers = list(cfg.teachers or [])
    unknown = [t for t in teachers if t not in TEACHER_COLUMNS]
    if not teachers or unknown or len(set(teachers)) < len(teachers):
        raise ConfigError(
            f"teachers must be a non-empty list of distinct names of {list(TEACHER_COLUMNS)}, got {teachers}"
        )
    if cfg.depth < 1:
        raise ConfigError(f"depth must be >= 1, got {cfg.depth}")
    if cfg.bm25_depth < cfg.depth:
        raise ConfigError(f"bm25_depth ({cfg.bm25_depth}) must be >= depth ({cfg.depth})")
    return teachers


def _index_cfg(cfg: DictConfig, model: str) -> DictConfig:
    """A pipeline config whose ``index`` is ``cfg.models.<model>`` (resolved), for ensure_index & co."""
    return OmegaConf.create(
        {
            "index": OmegaConf.to_container(cfg.models[model], resolve=True),
            "paths": {"indexes_dir": cfg.paths.indexes_dir},
            "index_dir": None,
            "overwrite": False,
            "threads": cfg.threads,
            "shard_size": cfg.shard_size,
        }
    )


# --------------------------------------------------------------------------- mining


def _search(search: SearchFn, qids: list[str], texts: list[str], k: int, batch_size: int, what: str) -> Run:
    """Every training query through ``search`` in batches, one merged run."""
    merged: dict[str, dict[str, float]] = {}
    for start in tqdm(range(0, len(qids), batch_size), desc=f"{what} search", unit="batch"):
        part = search(qids[start : start + batch_size], texts[start : start + batch_size], k)
        merged.update({qid: dict(part[qid]) for qid in part})
    return Run(merged, name=what)


def _mine(cfg: DictConfig, data, miner: str, qids: list[str], texts: list[str], k: int) -> tuple[Run, dict]:
    """The top ``k`` of every query in the miner's index (built when missing), and what it was."""
    index_cfg = _index_cfg(cfg, MINERS[miner])
    index_dir, manifest, _ = ensure_index(index_cfg, data)
    search, info = open_search(index_cfg, index_dir, manifest, data)
    run = _search(search, qids, texts, k, cfg.batch_size, miner)
    return run, {"index": str(index_dir.resolve()), "kind": manifest.kind, "encoder": info["query encoder"]}


def _mined(run: Run, qid: str, depth: int) -> list[str]:
    """The top ``depth`` doc ids of ``qid`` in ``run``, self hits (doc id == query id) left out."""
    if qid not in run:
        return []
    return [d for d, _ in run.ranked(qid) if d != qid][:depth]


def candidate_frame(training: TrainingSet, runs: dict[str, Run], depth: int) -> pl.DataFrame:
    """One row per (query, candidate): positives, then each miner's top ``depth``.

    Returns:
        DataFrame ``query_id``, ``doc_id``, ``label`` (int32, 0 when not judged) and one
        ``<miner>_rank`` (int32, 1-based, null outside that miner's top ``depth``) per run.
    """
    cols: dict[str, list] = {"query_id": [], "doc_id": [], "label": []}
    cols.update({f"{miner}_rank": [] for miner in runs})
    for qid in training.queries:
        ranks = {m: {d: r for r, d in enumerate(_mined(run, qid, depth), 1)} for m, run in runs.items()}
        docs = dict.fromkeys(training.positives(qid))
        for ranked in ranks.values():
            docs.update(dict.fromkeys(ranked))
        judged = training.qrels[qid]
        for doc in docs:
            cols["query_id"].append(qid)
            cols["doc_id"].append(doc)
            cols["label"].append(judged.get(doc, 0))
            for miner, ranked in ranks.items():
                cols[f"{miner}_rank"].append(ranked.get(doc))
    schema = {"query_id": pl.Utf8, "doc_id": pl.Utf8, "label": pl.Int32}
    schema.update({f"{miner}_rank": pl.Int32 for miner in runs})
    return pl.DataFrame(cols, schema=schema).sort("query_id", "doc_id")


# --------------------------------------------------------------------------- teachers


def bm25_scores(run: Run, query_ids: list[str], doc_ids: list[str], k: int) -> np.ndarray:
    """(P,) float32 BM25 score of each pair from ``run`` (searched at depth ``k``), floored (module doc)."""
    floors = {}
    for qid in set(query_ids):
        docs = run[qid] if qid in run else {}
        floors[qid] = min(docs.values()) if len(docs) >= k else 0.0
    pairs = zip(query_ids, doc_ids, strict=True)
    out = [run[q].get(d, floors[q]) if q in run else floors[q] for q, d in pairs]
    return np.asarray(out, dtype=np.float32)


def dense_pair_scores(
    queries: torch.Tensor, docs: torch.Tensor, q_rows: torch.Tensor, d_rows: torch.Tensor
) -> np.ndarray:
    """(P,) float32 ``<queries[q_rows[p]], docs[d_rows[p]]>`` of each pair ``p``.

    Args:
        queries: (Q, d) float32 query embeddings.
        docs: (D, d) float32 document embeddings.
        q_rows: (P,) int64 rows of ``queries``.
        d_rows: (P,) int64 rows of ``docs``.
    """
    out = torch.empty(q_rows.numel(), dtype=torch.float32)  # (P,)
    for start in range(0, q_rows.numel(), PAIR_CHUNK):
        q = queries[q_rows[start : start + PAIR_CHUNK]]  # (c, d)
        d = docs[d_rows[start : start + PAIR_CHUNK]]  # (c, d)
        out[start : start + PAIR_CHUNK] = (q.double() * d.double()).sum(1).float()
    return out.numpy()


def sparse_pair_scores(
    queries: torch.Tensor, docs: torch.Tensor, q_rows: torch.Tensor, d_rows: torch.Tensor
) -> np.ndarray:
    r"""(P,) float32 :math:`\sum_j q_j d_j` of the pairs ``(queries[q_rows[p]], docs[d_rows[p]])``.

    Each pair's document non-zeros are expanded and looked up in its query row (made dense
    for the queries of one chunk), so memory grows with the pairs' non-zeros, not with ``D``.

    Args:
        queries: (Q, V) sparse CSR float32.
        docs: (D, V) sparse CSR float32.
        q_rows: (P,) int64 rows of ``queries``.
        d_rows: (P,) int64 rows of ``docs``.
    """
    q_crow, q_col, q_val = queries.crow_indices(), queries.col_indices(), queries.values()
    d_crow, d_col, d_val = docs.crow_indices(), docs.col_indices(), docs.values()
    out = torch.empty(q_rows.numel(), dtype=torch.float32)  # (P,)
    for start in range(0, q_rows.numel(), PAIR_CHUNK):
        qr, dr = q_rows[start : start + PAIR_CHUNK], d_rows[start : start + PAIR_CHUNK]  # (c,)
        uniq, local = torch.unique(qr, return_inverse=True)  # (u,), (c,)
        dense_q = torch.zeros(uniq.numel(), queries.shape[1], dtype=torch.float64)  # (u, V)
        q_len = q_crow[uniq + 1] - q_crow[uniq]  # (u,)
        q_nz = _expand(q_crow[uniq], q_len)  # (nnz_u,) positions in q_col / q_val
        q_of_nz = torch.repeat_interleave(torch.arange(uniq.numel()), q_len)  # (nnz_u,)
        dense_q[q_of_nz, q_col[q_nz]] = q_val[q_nz].double()
        d_len = d_crow[dr + 1] - d_crow[dr]  # (c,)
        d_nz = _expand(d_crow[dr], d_len)  # (nnz_c,) positions in d_col / d_val
        pair = torch.repeat_interleave(torch.arange(qr.numel()), d_len)  # (nnz_c,)
        terms = dense_q[local[pair], d_col[d_nz]] * d_val[d_nz].double()  # (nnz_c,)
        sums = torch.zeros(qr.numel(), dtype=torch.float64).index_add_(0, pair, terms)  # (c,)
        out[start : start + PAIR_CHUNK] = sums
    return out.numpy()


def _expand(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    first = torch.cumsum(lengths, 0) - lengths  # (n,) where each run begins in the output
    total = int(lengths.sum())
    offsets = torch.arange(total) - torch.repeat_interleave(first, lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + offsets


def _dense_teacher(cfg: DictConfig, data, texts: list[str], doc_texts: list[str], q_rows, d_rows):
    from retrieval.encoders.dense import encode_dense_in_shards
    from retrieval.pipeline import dense_encoder

    index_cfg = _index_cfg(cfg, "dense")
    encoder = dense_encoder(index_cfg)
    cache = encoding_cache(index_dir_of(index_cfg, data), index_cfg.index.encoder)
    docs = encode_dense_in_shards(encoder, doc_texts, cache, shard_size=cfg.shard_size)  # (D, d)
    queries = encoder.encode(texts)  # (Q, d)
    model = {"name": encoder.name, "checksum": encoder.checksum, "encodings": str(cache.resolve())}
    return dense_pair_scores(queries, docs, q_rows, d_rows), model


def _splade_teacher(cfg: DictConfig, data, texts: list[str], doc_texts: list[str], q_rows, d_rows):
    from retrieval.encoders.sparse import encode_in_shards
    from retrieval.pipeline import sparse_encoder

    index_cfg = _index_cfg(cfg, "splade")
    encoder = sparse_encoder(index_cfg)
    cache = encoding_cache(index_dir_of(index_cfg, data), index_cfg.index.encoder)
    key = f"{encoder.name}:{encoder.checksum}"  # as pipeline._build_sparse, so its shards are reused
    docs = encode_in_shards(encoder.encode, doc_texts, cache, shard_size=cfg.shard_size, key=key)  # (D, V)
    queries = encoder.encode(texts)  # (Q, V)
    model = {"name": encoder.name, "checksum": encoder.checksum, "encodings": str(cache.resolve())}
    return sparse_pair_scores(queries, docs, q_rows, d_rows), model


# --------------------------------------------------------------------------- reading and checking


# --------------------------------------------------------------------------- the job


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """``frame`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def miner_recall(frame: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Per miner: the training positives in its top ``depth`` (count, micro recall, mean per query)."""
    positives = frame.filter(pl.col("label") > 0)
    out = {}
    for col in (c for c in frame.columns if c.endswith("_rank")):
        found = pl.col(col).is_not_null()
        per_query = positives.group_by("query_id").agg(found.mean().alias("recall"))
        out[col.removesuffix("_rank")] = {
            "found": int(positives[col].is_not_null().sum()),
            "positives": positives.height,
            "recall": float(positives[col].is_not_null().mean()),
            "mean_query_recall": float(per_query["recall"].mean()),
        }
    return out


def _counts(frame: pl.DataFrame) -> dict:
    per_query = frame.group_by("query_id").len()["len"]
    return {
        "queries": per_query.len(),
        "rows": frame.height,
        "positives": int((frame["label"] > 0).sum()),
        "candidates_per_query": {
            "mean": float(per_query.mean()),
            "min": int(per_query.min()),
            "max": int(per_query.max()),
        },
    }


def _row_indices(frame: pl.DataFrame, qids: list[str], corpus: pl.DataFrame) -> tuple[torch.Tensor, ...]:
    """(P,) int64 each: every row's query position in ``qids`` and document row in ``corpus``."""
    position = {q: i for i, q in enumerate(qids)}
    doc_row = dict(zip(corpus["doc_id"].to_list(), corpus["doc"].to_list(), strict=True))
    q_rows = torch.tensor([position[q] for q in frame["query_id"].to_list()], dtype=torch.int64)
    d_rows = torch.tensor([doc_row[d] for d in frame["doc_id"].to_list()], dtype=torch.int64)
    return q_rows, d_rows


def _score(cfg, teachers, data, training, frame, runs, miners, bm25_k) -> tuple[pl.DataFrame, dict]:
    """``frame`` with one float32 column per teacher, and each teacher's model (name, checksum)."""
    q_rows, d_rows = _row_indices(frame, list(training.queries), data.corpus)
    texts = list(training.queries.values())
    doc_texts = document_texts(data.corpus) if {"dense", "splade"} & set(teachers) else []
    models, scores = {}, {}
    for teacher in teachers:
        log.info("teacher %s: scoring %d (query, candidate) pairs", teacher, frame.height)
        if teacher == "bm25":
            k1, b = cfg.models.bm25.k1, cfg.models.bm25.b
            pairs = frame["query_id"].to_list(), frame["doc_id"].to_list()
            scores[teacher] = bm25_scores(runs["bm25"], *pairs, bm25_k)
            models[teacher] = {"name": f"Lucene BM25 k1={k1} b={b}", "checksum": None, **miners["bm25"]}
        elif teacher == "dense":
            scores[teacher], models[teacher] = _dense_teacher(cfg, data, texts, doc_texts, q_rows, d_rows)
        else:
            scores[teacher], models[teacher] = _splade_teacher(cfg, data, texts, doc_texts, q_rows, d_rows)
    return frame.with_columns(pl.Series(t, scores[t], dtype=pl.Float32) for t in teachers), models


def run(cfg: DictConfig) -> Path:
    """Mine candidates, score them with every teacher, write the parquet file and its sidecar."""
    teachers = _check_cfg(cfg)
    data = load_dataset(cfg)
    training = load_training_set(data, cfg.train.queries, cfg.train.qrels, drop_unknown=cfg.drop_unknown)
    qids, texts = list(training.queries), list(training.queries.values())
    bm25_k = max(cfg.bm25_depth, cfg.depth + 1)  # one more than depth: room for a dropped self hit
    runs, miners = {}, {}
    for miner, k in (("bm25", bm25_k), ("dense", cfg.depth + 1)):
        runs[miner], miners[miner] = _mine(cfg, data, miner, qids, texts, k)
    frame = candidate_frame(training, runs, cfg.depth)
    frame, models = _score(cfg, teachers, data, training, frame, runs, miners, bm25_k)

    name = cfg.name or training.qrels_path.stem
    out = Path(cfg.out or Path(cfg.paths.indexes_dir) / data.name / "teachers" / f"{name}.parquet").resolve()
    check_teacher_scores(frame, out, training)
    _write_parquet(frame, out)
    counts, recall = _counts(frame), miner_recall(frame)
    sidecar = {
        "teachers": teachers,
        "models": models,
        "miners": miners,
        "dataset": str(data.path),
        "training": {
            "name": training.name,
            "queries": str(training.queries_path),
            "qrels": str(training.qrels_path),
            "drop_unknown": bool(cfg.drop_unknown),
        },
        "depth": cfg.depth,
        "bm25_depth": cfg.bm25_depth,
        "counts": counts,
        "miner_recall": recall,
        "sparrow_version": sparrow_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(sidecar, indent=2) + "\n")
    _log_summary(out, counts, recall, cfg.depth)
    return out


def _log_summary(out: Path, counts: dict, recall: dict, depth: int) -> None:
    per = counts["candidates_per_query"]
    log.info(
        "wrote %s: %d queries, %d rows, candidates per query %.1f (min %d, max %d), %d positives",
        *(out, counts["queries"], counts["rows"], per["mean"], per["min"], per["max"], counts["positives"]),
    )
    for miner, r in recall.items():
        log.info(
            "%s recall@%d of the training positives: %.4f (%d of %d; mean over queries %.4f)",
            *(miner, depth, r["recall"], r["found"], r["positives"], r["mean_query_recall"]),
        )


main = entry_point("retrieval_teachers", run)

if __name__ == "__main__":
    main()
