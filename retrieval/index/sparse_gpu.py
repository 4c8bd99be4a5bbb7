"""An exact sparse index on the GPU: a term-major inverted index scored by the sparse top-k kernel.

The same vectors as ``sparse_torch`` (SPLADE documents; SPLADE or IDF queries), stored as the
inverted index of :class:`~retrieval.kernels.inverted_index.InvertedIndex` -- per term, int32
document ids and float16 (or bfloat16 / float32) weights: 6 bytes per non-zero in float16 against
``sparse_torch``'s 12. Queries are scored with :func:`~retrieval.kernels.sparse_topk.sparse_topk`:
the Triton kernel on a GPU, the torch reference on the CPU; both exact up to the weights'
rounding to ``weight_dtype`` (recorded in the manifest) and the order of equal scores. On a GPU,
batches are scored with a dense head of the most frequent terms (``head_terms``, built on load:
``2 N H`` bytes in float16) and single queries replay a CUDA graph
(:class:`~retrieval.kernels.sparse_single.SingleQuerySearch`).

On disk, an index directory holds:

* ``postings.pt`` -- ``{"indptr", "doc_ids", "weights", "num_docs", "block_bits"}``
  (``torch.load(..., weights_only=True)`` reads it; the block pointers are rebuilt on load);
* ``doc_ids.json`` -- the list of document ids, document ``i`` is ``doc_ids[i]``;
* ``manifest.json`` -- kind ``"sparse_gpu"``, written last; ``extra`` holds ``vocab_size``,
  ``nnz`` and ``weight_dtype``.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import torch

from retrieval.encoders.splade import resolve_device
from retrieval.eval.report import atomic_write_text
from retrieval.index.manifest import (
    IndexFormatError,
    Manifest,
    building,
    checksum,
    read_manifest,
    write_manifest,
)
from retrieval.index.sparse_torch import DOC_IDS, SHARDS, check_vectors, rankings
from retrieval.kernels.inverted_index import WEIGHT_DTYPES, InvertedIndex, csr_rows
from retrieval.kernels.sparse_single import SingleQuerySearch
from retrieval.kernels.sparse_topk import sparse_topk
from retrieval.types import Run

log = logging.getLogger(__name__)

KIND = "sparse_gpu"
POSTINGS = "postings.pt"


def build_sparse_gpu(
    doc_ids: list[str],
    vectors: torch.Tensor,
    out_dir: str | Path,
    *,
    encoder: str,
    encoder_checksum: str,
    tokenizer: str,
    corpus_path: str | Path,
    weight_dtype: str = "float16",
    overwrite: bool = False,
    extra: dict | None = None,
) -> Manifest:
    """Write a ``sparse_gpu`` index of document vectors (format in the module docstring).

    Built in ``<out_dir>.partial`` and renamed into place when complete.

    Args:
        doc_ids: (list[str]) distinct document ids, row ``i`` of ``vectors`` for ``doc_ids[i]``.
        vectors: (num_docs, V) sparse CSR non-negative document vectors.
        out_dir: (str | Path) the index directory to create.
        encoder, encoder_checksum, tokenizer: the document encoder's name, checksum and tokenizer.
        corpus_path: (str | Path) the corpus file the documents were read from (checksummed).
        weight_dtype: (str, default "float16") ``float16``, ``bfloat16`` or ``float32``.
        overwrite: (bool, default False) replace an existing index at ``out_dir``.
        extra: (dict | None) more settings recorded in the manifest's ``extra``.

    Raises:
        ValueError: bad vectors (:func:`~retrieval.index.sparse_torch.check_vectors`; negative,
            non-finite or, for ``weight_dtype``, too large weights) or an unknown ``weight_dtype``.
        IndexFormatError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    check_vectors(doc_ids, vectors)
    start = time.perf_counter()
    index = InvertedIndex.from_csr(vectors.cpu().to(torch.float32), WEIGHT_DTYPES[weight_dtype])
    with building(out_dir, overwrite=overwrite) as work:
        tmp = work / (POSTINGS + ".tmp")
        torch.save(index.state(), tmp)
        tmp.replace(work / POSTINGS)
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
            extra={
                "vocab_size": index.vocab_size,
                "nnz": int(index.doc_ids.numel()),
                "weight_dtype": weight_dtype,
                **(extra or {}),
            },
        )
        write_manifest(work, manifest)
    return manifest


class SparseGpuSearcher:
    r"""Exact top-k search over a ``sparse_gpu`` index.

    :math:`s(q, d) = \sum_j q_j d_j` in float32 over the stored (``weight_dtype``) document
    weights. Documents sharing no term with the query are not returned, so a query may get
    fewer than ``k``. The index lives on ``device`` (``cuda`` when available): the Triton kernels
    score it there; on the CPU the torch reference does, with the same results. A batch of one
    query goes through single-query mode (one CUDA graph replay) where ``single_query`` is on.

    Args:
        index_dir: (str | Path) an index written by :func:`build_sparse_gpu`.
        device: (str | None, default None) ``None`` picks ``cuda`` when available, else ``cpu``.
        budget_bytes: (int, default 1 GiB) float32 accumulators per wave of documents
            (:func:`~retrieval.kernels.sparse_topk.sparse_topk`).
        head_terms: (int, default 128) on a GPU, the most frequent terms kept as a dense head
            (:meth:`~retrieval.kernels.inverted_index.InvertedIndex.with_head`): ``2 N H`` more
            bytes in float16 (2.25 GB for 8.8M documents); 0 for none. Unused on the CPU.
        use_head: (bool | None, default None) score batches with the head: ``None`` where their
            head postings outweigh it (:func:`~retrieval.kernels.sparse_head.head_pays_off`).
        single_query: (bool | None, default None) score one-query batches with
            :class:`~retrieval.kernels.sparse_single.SingleQuerySearch` (CUDA graphs; Triton's
            interpreter on the CPU); ``None``: on a CUDA device.

    Raises:
        IndexFormatError: the directory is missing, half-built, of another kind, or its files
            disagree with the manifest.
    """

    def __init__(
        self,
        index_dir: str | Path,
        device: str | None = None,
        budget_bytes: int = 1 << 30,
        head_terms: int = 128,
        single_query: bool | None = None,
        use_head: bool | None = None,
    ):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, KIND)
        self.device = resolve_device(device)
        self.budget_bytes = budget_bytes
        self.single_query = self.device.type == "cuda" if single_query is None else single_query
        self.use_head = use_head
        self._single: dict[int, SingleQuerySearch] = {}  # by k
        try:
            self.doc_ids: list[str] = json.loads((self.index_dir / DOC_IDS).read_text(encoding="utf-8"))
            state = torch.load(self.index_dir / POSTINGS, weights_only=True)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            raise IndexFormatError(f"{self.index_dir}: unreadable index files ({err}); rebuild it") from err
        if not len(self.doc_ids) == state["num_docs"] == self.manifest.num_docs:
            raise IndexFormatError(
                f"{self.index_dir}: {len(self.doc_ids)} doc ids, {state['num_docs']} documents in the "
                f"postings, manifest says {self.manifest.num_docs}; rebuild the index"
            )
        head = head_terms if self.device.type == "cuda" else 0
        self.index = InvertedIndex.from_state(state, self.device, head_terms=head)
        log.info(
            "sparse_gpu index %s: %d documents, %.1f MB of postings and dense head on %s",
            self.index_dir,
            self.index.num_docs,
            self.index.nbytes / 1e6,
            self.device,
        )

    @property
    def vocab_size(self) -> int:
        return self.index.vocab_size

    def search(
        self, query_ids: list[str], query_vectors: torch.Tensor, k: int = 1000, batch_size: int = 1000
    ) -> Run:
        """The top-``k`` documents of each query, ``batch_size`` queries per kernel call (a
        batch of one in single-query mode, :attr:`single_query`).

        Raises:
            ValueError: row count or vocabulary mismatch, ``k < 1``, or bad query weights.
        """
        if query_vectors.dim() != 2 or query_vectors.shape[0] != len(query_ids):
            raise ValueError(f"{tuple(query_vectors.shape)} query vectors for {len(query_ids)} query ids")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        queries = query_vectors.to_sparse_csr().to(torch.float32)
        run: dict[str, dict[str, float]] = {}
        for lo in range(0, len(query_ids), batch_size):
            block = csr_rows(queries, lo, lo + batch_size).to(self.device)
            scores, docs = self.score(block, k)  # (B, k) each
            run.update(rankings(query_ids[lo : lo + batch_size], scores, docs, self.doc_ids))
        return Run(run)

    def score(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, docs) of a ``(B, V)`` CSR block on the index's device: (B, k) each.

        One query in single-query mode (a :class:`SingleQuerySearch` kept per ``k``), else
        :func:`~retrieval.kernels.sparse_topk.sparse_topk`.
        """
        if queries.shape[0] == 1 and self.single_query:
            if k not in self._single:
                self._single[k] = SingleQuerySearch(self.index, k, self.budget_bytes)
            return self._single[k](queries)
        return sparse_topk(self.index, queries, k, self.budget_bytes, self.use_head)
