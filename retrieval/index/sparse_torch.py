"""An exact sparse index in plain torch: all document vectors in memory, ``Q @ D^T`` per query block.

No approximation and no quantization: scores are the float32 dot products of the query and
document vectors (e.g. SPLADE, or IDF queries against SPLADE documents), so this back-end is
the reference the Lucene impact index is compared against. It suits corpora whose vectors fit
in memory: 12 bytes per non-zero (int64 column + float32 value), e.g. 15 MB for SciFact's 5,183
documents with splade-tiny (248 non-zeros per document).

On disk, an index directory holds:

* ``vectors.pt`` -- the ``(num_docs, V)`` CSR matrix as ``{"crow_indices", "col_indices",
  "values", "shape"}`` (:func:`retrieval.encoders.sparse.save_csr`; ``torch.load(...,
  weights_only=True)`` reads it);
* ``doc_ids.json`` -- the list of document ids, row ``i`` of the matrix for ``doc_ids[i]``;
* ``manifest.json`` -- kind ``"sparse_torch"``, written last (:mod:`retrieval.index.manifest`);
  ``extra`` holds ``vocab_size`` and ``nnz``.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import torch

from retrieval.encoders.sparse import load_csr, save_csr
from retrieval.encoders.splade import resolve_device
from retrieval.eval.report import atomic_write_text
from retrieval.eval.topk import topk_with_id_ties
from retrieval.index.manifest import (
    IndexFormatError,
    Manifest,
    building,
    checksum,
    read_manifest,
    write_manifest,
)
from retrieval.kernels.inverted_index import csr_rows
from retrieval.types import Run

log = logging.getLogger(__name__)

KIND = "sparse_torch"
VECTORS = "vectors.pt"
DOC_IDS = "doc_ids.json"
SHARDS = "shards"  # encode_in_shards' folder inside the work directory; removed once the index is written


def build_sparse_torch(
    doc_ids: list[str],
    vectors: torch.Tensor,
    out_dir: str | Path,
    *,
    encoder: str,
    encoder_checksum: str,
    tokenizer: str,
    corpus_path: str | Path,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Manifest:
    """Write a ``sparse_torch`` index of document vectors (format in the module docstring).

    The files are written in ``<out_dir>.partial`` and renamed into place when complete
    (:func:`retrieval.index.manifest.building`); a ``shards/`` folder left there by
    :func:`retrieval.encoders.sparse.encode_in_shards` is removed before the manifest is written.

    Args:
        doc_ids: (list[str]) document ids, distinct, row ``i`` of ``vectors`` for ``doc_ids[i]``.
        vectors: (num_docs, V) sparse CSR float32 document vectors.
        out_dir: (str | Path) the index directory to create.
        encoder: (str) the document encoder's name (``SpladeEncoder.name``).
        encoder_checksum: (str) its checksum (``SpladeEncoder.checksum``).
        tokenizer: (str) its tokenizer's name.
        corpus_path: (str | Path) the corpus file the documents were read from (checksummed).
        overwrite: (bool, default False) replace an existing index at ``out_dir``.
        extra: (dict | None, default None) more settings recorded in the manifest's ``extra``.

    Returns:
        the manifest written.

    Raises:
        ValueError: ``vectors`` is not a 2-D CSR tensor with one row per id, or ids repeat.
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is False.
    """
    check_vectors(doc_ids, vectors)
    start = time.perf_counter()
    vectors = vectors.cpu().to(torch.float32)
    with building(out_dir, overwrite=overwrite) as work:
        save_csr(work / VECTORS, vectors)
        atomic_write_text(work / DOC_IDS, json.dumps(list(doc_ids), ensure_ascii=False) + "\n")
        shutil.rmtree(work / SHARDS, ignore_errors=True)
        manifest = Manifest(
            kind=KIND,
            encoder=encoder,
            encoder_checksum=encoder_checksum,
            tokenizer=tokenizer,
            num_docs=len(doc_ids),
            corpus=str(corpus_path),
            corpus_checksum=checksum([corpus_path]),
            build_seconds=time.perf_counter() - start,
            extra={"vocab_size": vectors.shape[1], "nnz": int(vectors.values().numel()), **(extra or {})},
        )
        write_manifest(work, manifest)
    return manifest


def check_vectors(doc_ids: list[str], vectors: torch.Tensor) -> None:
    if vectors.layout != torch.sparse_csr or vectors.dim() != 2:
        raise ValueError(
            f"vectors must be a 2-D sparse CSR tensor, got {vectors.layout} {tuple(vectors.shape)}"
        )
    if vectors.shape[0] != len(doc_ids):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(doc_ids)} doc ids")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc ids must be distinct")


class SparseTorchSearcher:
    r"""Exact top-k search over a ``sparse_torch`` index.

    The score of document :math:`d` for query :math:`q` is :math:`s(q, d) = \sum_j q_j d_j`, in
    float32. The index is held transposed, as a CSR ``(V, N)`` matrix -- one row of postings per
    term, an inverted index -- and a block of ``B`` CSR query rows is multiplied by it
    (sparse x sparse, ``Q @ D^T``), so the work is the postings of the query terms only.

    Measured on SciFact with splade-tiny (5,183 documents, 1.29M non-zeros; 300 SPLADE queries of
    53 non-zeros on average; 2-core CPU, torch 2.13; scoring only, all 300 queries):

    ============================================  ==================  ==================
    strategy                                      batch of 1          batch of 64
    ============================================  ==================  ==================
    ``Q_csr @ D^T_csr`` (this class)              3.0 ms / query      0.40 ms / query
    dense ``Q`` block, ``sparse.mm(D_csr, Q^T)``  6.2 ms / query      0.62 ms / query
    dense ``Q`` block ``@ D^T_csr``               307 ms / query      7.5 ms / query
    dense documents, ``Q @ D^T``                  33 ms / query       8.3 ms / query
    ============================================  ==================  ==================

    All agree with a dense float32 product within 2e-5 (the summation order differs).

    Documents scoring exactly 0 share no term with the query and are not returned (as from an
    inverted index), so a query may get fewer than ``k`` documents. Among equal scores at the
    ``k``-th place the lower document index (row of the index) is kept
    (:func:`retrieval.eval.topk.topk_with_id_ties`); the :class:`~retrieval.types.Run` itself is
    ordered by trec_eval's rule when read.

    Args:
        index_dir: (str | Path) an index written by :func:`build_sparse_torch`.
        device: (str | None, default None) where vectors and scoring live; ``None`` picks ``cuda``
            when available, else ``cpu``.

    Attributes:
        manifest: (Manifest) the index's manifest.
        doc_ids: (list[str]) document ids by row.
        vocab_size: (int) ``V``.
        postings: (torch.Tensor) (V, N) sparse CSR, the transposed document vectors.

    Raises:
        IndexFormatError: the directory is missing, half-built (no manifest), of another kind, or
            its files disagree with the manifest.
    """

    def __init__(self, index_dir: str | Path, device: str | None = None):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, KIND)
        self.device = resolve_device(device)
        try:
            self.doc_ids: list[str] = json.loads((self.index_dir / DOC_IDS).read_text(encoding="utf-8"))
            vectors = load_csr(self.index_dir / VECTORS)  # (N, V)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            raise IndexFormatError(f"{self.index_dir}: unreadable index files ({err}); rebuild it") from err
        if not len(self.doc_ids) == vectors.shape[0] == self.manifest.num_docs:
            raise IndexFormatError(
                f"{self.index_dir}: {len(self.doc_ids)} doc ids, {vectors.shape[0]} vectors, manifest says "
                f"{self.manifest.num_docs} documents; rebuild the index"
            )
        self.vocab_size = vectors.shape[1]
        self.postings = vectors.t().to_sparse_csr().to(self.device)  # (V, N)
        log.info("sparse_torch index %s: %d documents on %s", self.index_dir, len(self.doc_ids), self.device)

    def search(
        self, query_ids: list[str], query_vectors: torch.Tensor, k: int = 1000, batch_size: int = 64
    ) -> Run:
        """The top-``k`` documents of each query.

        Args:
            query_ids: (list[str]) query ids, row ``i`` of ``query_vectors`` for ``query_ids[i]``.
            query_vectors: (n, V) sparse CSR (or dense) query vectors, over the index's vocabulary.
            k: (int, default 1000) documents per query, >= 1.
            batch_size: (int, default 64) queries scored together (memory: a dense
                ``(batch_size, num_docs)`` block of scores).

        Returns:
            ``Run`` with every query id (an empty ranking when no document shares a term).

        Raises:
            ValueError: a row count or vocabulary size that does not match, or ``k < 1``.
        """
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got {k} and {batch_size}")
        if query_vectors.dim() != 2 or query_vectors.shape[0] != len(query_ids):
            raise ValueError(f"{tuple(query_vectors.shape)} query vectors for {len(query_ids)} query ids")
        if query_vectors.shape[1] != self.vocab_size:
            raise ValueError(
                f"query vectors have V={query_vectors.shape[1]} but the index has V={self.vocab_size}: "
                "use the index's tokenizer"
            )
        queries = query_vectors.to_sparse_csr().to(torch.float32)
        run: dict[str, dict[str, float]] = {}
        for lo in range(0, len(query_ids), batch_size):
            scores = self.score(csr_rows(queries, lo, lo + batch_size).to(self.device))  # (B, N)
            values, rows = topk_with_id_ties(scores.masked_fill_(scores == 0, float("-inf")), k)  # (B, k)
            run.update(rankings(query_ids[lo : lo + batch_size], values, rows, self.doc_ids))
        return Run(run)

    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N) dense float32 scores of a CSR ``(B, V)`` query block against every document."""
        return (queries @ self.postings).to_dense()  # (B, V) @ (V, N) -> (B, N)


def rankings(
    query_ids: list[str], values: torch.Tensor, rows: torch.Tensor, doc_ids: list[str]
) -> dict[str, dict[str, float]]:
    """``{query id: {doc id: score}}`` of (B, k) top-k scores and document rows (row -1: empty slot)."""
    return {
        qid: {doc_ids[i]: v for v, i in zip(vals, idx, strict=True) if i >= 0}
        for qid, vals, idx in zip(query_ids, values.tolist(), rows.tolist(), strict=True)
    }
