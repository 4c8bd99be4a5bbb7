"""Training data for sparse encoders: a query, a positive, hard negatives and the teachers' targets.

Data flows one way: BEIR files and the precomputed teacher-score file (``python -m
retrieval.teachers``) -> :class:`SparseTrainingData` -> :class:`~retrieval.training.module.
SparseEncoderModule`. Training never calls a teacher.

Per training query the teacher file holds candidates: its positives and the top documents of
the BM25 and dense mining indexes, each with every teacher's score. At set-up the selected
teachers are combined per query into one target by :func:`~retrieval.losses.
ensemble_teacher_scores` (min-max over *all* of the query's candidates, average, times S), so a
query's targets do not depend on which negatives a step samples.

Each example is one query with one positive (uniform over its positives) and ``negatives``
hard negatives drawn uniformly, without replacement when there are enough, from its
non-positive candidates ranked within ``negative_depth`` by a miner. Sampling uses torch's
global generator, so ``seed_everything`` makes it reproducible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data.beir import BeirData, document_texts, load_beir
from retrieval.data.teacher_scores import read_teacher_scores, teacher_columns
from retrieval.data.training import TrainingDataError, TrainingSet, load_training_set
from retrieval.losses import ensemble_teacher_scores
from retrieval.types import Qrels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidates:
    """Padded per-query candidate tables (Q queries, C = the largest candidate count).

    Attributes:
        query_ids: (list[str]) Q training query ids.
        docs: (Q, C) int64 corpus row of each candidate, -1 for padding.
        positive: (Q, C) bool judged relevant.
        negative: (Q, C) bool a hard negative: not relevant and mined within the depth.
        target: (Q, C) float32 the teachers' ensemble score (0 on padding).
    """

    query_ids: list[str]
    docs: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    target: torch.Tensor


def candidate_tables(
    frame: pl.DataFrame, doc_row: dict[str, int], teachers: list[str], scale: float, negative_depth: int
) -> Candidates:
    """Group the teacher file by query into padded tensors and combine the chosen teachers.

    Raises:
        TrainingDataError: a requested teacher is not a column of the file.
    """
    available = teacher_columns(frame)
    missing = [t for t in teachers if t not in available]
    if missing:
        raise TrainingDataError(f"teacher(s) {missing} not in the teacher file (it has {available})")
    if negative_depth < 1:
        raise TrainingDataError(f"negative_depth must be >= 1, got {negative_depth}")
    ranks = [c for c in ("bm25_rank", "dense_rank") if c in frame.columns]
    mined = pl.any_horizontal([pl.col(c).is_not_null() & (pl.col(c) <= negative_depth) for c in ranks])
    frame = frame.with_columns(
        pl.col("doc_id").replace_strict(doc_row, return_dtype=pl.Int64).alias("row"),
        (pl.col("label") > 0).alias("pos"),
        ((pl.col("label") <= 0) & mined).alias("neg"),
    )
    grouped = frame.group_by("query_id", maintain_order=True).agg(
        pl.col("row"), pl.col("pos"), pl.col("neg"), *[pl.col(t) for t in teachers]
    )
    q, c = grouped.height, int(grouped["row"].list.len().max())
    docs = torch.full((q, c), -1, dtype=torch.int64)
    positive = torch.zeros(q, c, dtype=torch.bool)
    negative = torch.zeros(q, c, dtype=torch.bool)
    scores = [torch.zeros(q, c) for _ in teachers]
    for i, row in enumerate(grouped.iter_rows(named=True)):
        n = len(row["row"])
        docs[i, :n] = torch.tensor(row["row"])
        positive[i, :n] = torch.tensor(row["pos"])
        negative[i, :n] = torch.tensor(row["neg"])
        for t, name in enumerate(teachers):
            scores[t][i, :n] = torch.tensor(row[name], dtype=torch.float32)
    valid = docs >= 0  # (Q, C)
    target = ensemble_teacher_scores(scores, valid, scale=scale) if teachers else torch.zeros(q, c)
    return Candidates(grouped["query_id"].to_list(), docs, positive, negative, target)


class TrainingExamples(Dataset):
    """One item per training query: its text, 1 positive + n negative doc texts, their targets."""

    def __init__(self, candidates: Candidates, queries: dict[str, str], docs: list[str], negatives: int):
        keep = candidates.positive.any(1) & candidates.negative.any(1)  # (Q,)
        dropped = int((~keep).sum())
        if dropped:
            log.info("%d training queries have no positive or no hard negative candidate; left out", dropped)
        if not keep.any():
            raise TrainingDataError("no training query has both a positive and a hard-negative candidate")
        idx = keep.nonzero().squeeze(1)
        self.query_ids = [candidates.query_ids[i] for i in idx.tolist()]
        self.query_texts = [queries[q] for q in self.query_ids]
        self.docs, self.positive = candidates.docs[idx], candidates.positive[idx]  # (Q, C) each
        self.negative, self.target = candidates.negative[idx], candidates.target[idx]
        self.doc_texts = docs
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.query_ids)

    def __getitem__(self, i: int) -> dict:
        pos_cols = self.positive[i].nonzero().squeeze(1)  # (P,)
        neg_cols = self.negative[i].nonzero().squeeze(1)  # (N_i,)
        pos = pos_cols[torch.randint(len(pos_cols), (1,))]  # (1,)
        if len(neg_cols) >= self.negatives:
            neg = neg_cols[torch.randperm(len(neg_cols))[: self.negatives]]  # (n,)
        else:
            neg = neg_cols[torch.randint(len(neg_cols), (self.negatives,))]  # (n,) with replacement
        cols = torch.cat([pos, neg])  # (1 + n,)
        rows = self.docs[i, cols]  # (1 + n,) corpus rows
        return {
            "query": self.query_texts[i],
            "docs": [self.doc_texts[j] for j in rows.tolist()],
            "rows": rows,
            "positives": self.docs[i, pos_cols],  # (P,) corpus rows of every judged positive
            "target": self.target[i, cols],  # (1 + n,)
        }


def collate(items: list[dict]) -> dict:
    """Texts stay texts (the module tokenizes them); targets and corpus rows stack to (B, 1 + n).

    ``positive_rows`` (B, P_max) holds each query's judged positives, padded with -1, so the
    module can keep a query's other positives out of its in-batch negatives.
    """
    return {
        "queries": [it["query"] for it in items],  # B
        "docs": [d for it in items for d in it["docs"]],  # B * (1 + n), query-major
        "target": torch.stack([it["target"] for it in items]),  # (B, 1 + n)
        "doc_rows": torch.stack([it["rows"] for it in items]),  # (B, 1 + n)
        "positive_rows": torch.nn.utils.rnn.pad_sequence(
            [it["positives"] for it in items], batch_first=True, padding_value=-1
        ),  # (B, P_max)
    }


class SparseTrainingData(L.LightningDataModule):
    """Training examples from a BEIR dataset and its teacher-score file; validation on a split.

    Args:
        dataset: (str) a BEIR folder name under ``root``.
        teacher_file: (str) the parquet file of ``python -m retrieval.teachers``.
        split: (str, default "train") the qrels split giving training queries and judgements
            when ``train_queries`` / ``train_qrels`` are None (it must exist).
        train_queries: (str | None) a queries file (BEIR jsonl or ``QID<TAB>text``); a relative
            path is inside the dataset folder.
        train_qrels: (str | None) a qrels file (BEIR TSV or TREC); relative: as above.
        drop_unknown: (bool, default False) skip judgements naming unknown ids instead of refusing.
        val_split: (str | None, default None) a qrels split for validation (NDCG@10 over the
            whole corpus); None: no validation.
        val_fraction: (float, default 0) instead of ``val_split``: hold this fraction of the
            training queries out for validation (never trained on), for datasets without a dev
            split; chosen by ``val_seed``, the same for every training seed.
        val_seed: (int, default 0) seed of the held-out draw.
        root: (str | None) the datasets root.
        path: (str | None) a BEIR folder anywhere; overrides ``dataset``.
        teachers: (list[str]) teacher columns combined into the distillation target.
        teacher_scale: (float, default 30) S of the ensemble.
        negatives: (int, default 7) hard negatives per query and step.
        negative_depth: (int, default 50) a negative must rank within this depth of a miner.
        batch_size: (int, default 16) queries per step (per device).
        eval_batch_size: (int, default 64) documents per validation batch.
        num_workers: (int, default 0) DataLoader workers.
    """

    def __init__(
        self,
        dataset: str,
        teacher_file: str,
        split: str = "train",
        train_queries: str | None = None,
        train_qrels: str | None = None,
        drop_unknown: bool = False,
        val_split: str | None = None,
        root: str | None = None,
        teachers: tuple[str, ...] = ("bm25", "dense", "splade"),
        teacher_scale: float = 30.0,
        negatives: int = 7,
        negative_depth: int = 50,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        path: str | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
    ):
        super().__init__()
        if negatives < 1:
            raise TrainingDataError(f"negatives must be >= 1, got {negatives}")
        if batch_size < 1:
            raise TrainingDataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.teacher_file, self.split = path or dataset, teacher_file, split
        self.train_queries, self.train_qrels, self.drop_unknown = train_queries, train_qrels, drop_unknown
        if not 0.0 <= val_fraction < 1.0:
            raise TrainingDataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction and val_split:
            raise TrainingDataError("give val_split or val_fraction, not both")
        self.val_split, self.root = val_split, root
        self.val_fraction, self.val_seed = val_fraction, val_seed
        self.teachers, self.teacher_scale = list(teachers), teacher_scale
        self.negatives, self.negative_depth = negatives, negative_depth
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.training: TrainingSet | None = None
        self.val: BeirData | None = None
        self.examples: TrainingExamples | None = None

    def prepare(self) -> None:
        """Read and check everything (idempotent); called by :meth:`setup` and before training."""
        if self.examples is not None:
            return
        data = load_beir(self.dataset, split=self.split, root=self.root)
        self.training = load_training_set(data, self.train_queries, self.train_qrels, self.drop_unknown)
        frame = read_teacher_scores(self.teacher_file, self.training)
        if self.val_fraction:
            self.val = held_out(self.training, self.val_fraction, self.val_seed)
            frame = frame.filter(~pl.col("query_id").is_in(self.val.queries["query_id"].implode()))
        doc_row = dict(zip(self.training.corpus["doc_id"], self.training.corpus["doc"], strict=True))
        cands = candidate_tables(frame, doc_row, self.teachers, self.teacher_scale, self.negative_depth)
        texts = document_texts(self.training.corpus)
        self.examples = TrainingExamples(cands, self.training.queries, texts, self.negatives)
        log.info(
            "training data: %d queries, 1 positive + %d hard negatives each; teachers %s (S=%g) from %s",
            len(self.examples),
            self.negatives,
            self.teachers or "none",
            self.teacher_scale,
            self.teacher_file,
        )
        if self.val_split:
            self.val = load_beir(self.dataset, split=self.val_split, root=self.root)
        if self.val is not None:
            log.info("validation: %s", self.val)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def corpus_texts(self) -> list[str]:
        return self.examples.doc_texts

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = torch.utils.data.DistributedSampler(self.examples, shuffle=True, drop_last=True)
        return DataLoader(
            self.examples,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,  # equal batches on every rank: in-batch negatives are gathered
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        return DataLoader(
            self.corpus_texts,
            batch_size=self.eval_batch_size,
            collate_fn=list,  # batches of texts
        )


def held_out(training: TrainingSet, fraction: float, seed: int) -> BeirData:
    """A validation split of ``fraction`` of the training queries (at least 1, never all).

    Drawn by a seeded permutation of the sorted query ids, so it depends on the data and
    ``seed`` only. The caller removes these queries from training.

    Raises:
        TrainingDataError: fewer than 2 training queries.
    """
    qids = sorted(training.queries)
    if len(qids) < 2:
        raise TrainingDataError(f"{training.name}: {len(qids)} training queries; cannot hold any out")
    n = min(len(qids) - 1, max(1, round(fraction * len(qids))))
    order = torch.randperm(len(qids), generator=torch.Generator().manual_seed(seed))[:n]
    chosen = sorted(qids[i] for i in order.tolist())
    queries = pl.DataFrame({"query_id": chosen, "text": [training.queries[q] for q in chosen]})
    qrels = Qrels({q: training.qrels[q] for q in chosen}, name=f"{training.name}-heldout")
    split = f"{Path(training.qrels_path).stem}, {n} held-out queries (seed {seed})"
    return BeirData(training.name, split, training.corpus, queries, qrels, training.dataset_path)
