"""Document vectors as a term-major inverted index, and the sparse queries it scores.

**Layout** (:class:`InvertedIndex`): term-major CSC -- per term :math:`j`, the ids (int32) and
weights (float16 / bfloat16 / float32) of its documents, sorted by document id, at
``indptr[j]:indptr[j + 1]``; and a block pointer table ``block_ptr`` (V, n_blocks + 1) giving, for
every term and every block of ``2^block_bits`` document ids, where that block's postings start, so
a document range's part of any posting list is found without a search. An index may also hold a
dense head of its most frequent terms (:meth:`InvertedIndex.with_head`, used as described in
:mod:`retrieval.kernels.sparse_head`).

**Queries**: a ``(B, V)`` matrix of finite weights ``>= 0``, checked once before any kernel runs
(:func:`check_queries`) and read as CSR rows (:func:`csr_rows`) or as (query row, term, weight)
pairs (:func:`query_pairs`), the unit of work of :mod:`retrieval.kernels.sparse_topk`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class InvertedIndex:
    """Document vectors as a term-major (CSC) inverted index (layout in the module docstring).

    Attributes:
        indptr: (V + 1,) int64, term ``j``'s postings at ``indptr[j]:indptr[j + 1]``.
        doc_ids: (P,) int32 document ids, ascending within each term.
        weights: (P,) float16, bfloat16 or float32 non-negative weights.
        block_ptr: (V, n_blocks + 1) int64, ``block_ptr[j, b]`` the first posting of term ``j``
            with document id ``>= b * 2^block_bits``; ``block_ptr[j, -1] = indptr[j + 1]``.
        num_docs: (int) N.
        block_bits: (int) log2 of the documents per block.
        head: (N, H') the dense weights of the head terms (:meth:`with_head`; columns past the
            head terms are 0, ``H'`` a multiple of 16), or None.
        head_slot: (V,) int64 column of ``head`` holding each term, ``-1`` for tail terms, or None.
    """

    indptr: Tensor
    doc_ids: Tensor
    weights: Tensor
    block_ptr: Tensor
    num_docs: int
    block_bits: int
    head: Tensor | None = None
    head_slot: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.indptr.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    @property
    def nbytes(self) -> int:
        """Bytes of the postings (ids and weights), the pointer tables and the dense head."""
        parts = (self.indptr, self.doc_ids, self.weights, self.block_ptr, self.head, self.head_slot)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def with_head(self, n_terms: int) -> InvertedIndex:
        """This index with a dense head of its ``n_terms`` most frequent terms (0: without one).

        The head is ``(N, H')`` in the weights' dtype, ``H'`` = ``n_terms`` rounded up to a multiple
        of 16 (the tensor cores' step): ``2 N H'`` bytes for float16 / bfloat16 weights. Terms with
        no postings are never in it; ties in frequency go to the lower term id.

        Raises:
            ValueError: ``n_terms < 0``.
        """
        if n_terms < 0:
            raise ValueError(f"the head size must be >= 0 terms, got {n_terms}")
        lengths = self.indptr.diff()  # (V,)
        n = min(n_terms, int((lengths > 0).sum()))
        if n == 0:
            return replace(self, head=None, head_slot=None)
        terms = torch.sort(lengths, descending=True, stable=True).indices[:n]  # (H,) most frequent first
        width = -(-n // 16) * 16
        head = torch.zeros(self.num_docs, width, dtype=self.weights.dtype, device=self.device)  # (N, H')
        flat = head.view(-1)
        starts, ends = self.indptr[terms].tolist(), self.indptr[terms + 1].tolist()
        for slot, (start, end) in enumerate(zip(starts, ends, strict=True)):
            flat[self.doc_ids[start:end].to(torch.int64) * width + slot] = self.weights[start:end]
        slot = torch.full((self.vocab_size,), -1, dtype=torch.int64, device=self.device)  # (V,)
        slot[terms] = torch.arange(n, device=self.device)
        return replace(self, head=head, head_slot=slot)

    @classmethod
    def from_csr(
        cls, docs: Tensor, dtype: torch.dtype = torch.float16, block_bits: int = 14
    ) -> InvertedIndex:
        """The inverted index of ``(N, V)`` CSR document vectors.

        Raises:
            ValueError: negative, NaN or infinite weights, a weight too large for ``dtype``, or an
                unsupported dtype.
        """
        if dtype not in WEIGHT_DTYPES.values():
            raise ValueError(f"weights dtype must be one of {list(WEIGHT_DTYPES)}, got {dtype}")
        docs = docs.to_sparse_csr()
        values = docs.values()
        if values.numel():
            if not torch.isfinite(values).all():
                raise ValueError("document weights must be finite (found NaN or inf)")
            if values.min() < 0:
                raise ValueError(f"document weights must be >= 0, found {float(values.min())}")
            if values.max() > torch.finfo(dtype).max:
                raise ValueError(f"document weight {float(values.max())} overflows {dtype}")
        num_docs, vocab = docs.shape
        csc = docs.t().to_sparse_csr()  # (V, N): one row of postings per term, doc ids ascending
        indptr = csc.crow_indices().to(torch.int64)  # (V + 1,)
        doc_ids = csc.col_indices().to(torch.int32)  # (P,)
        weights = csc.values().to(dtype)  # (P,)
        return cls(
            indptr,
            doc_ids,
            weights,
            block_pointers(indptr, doc_ids, num_docs, block_bits),
            num_docs,
            block_bits,
        )

    def to(self, device: torch.device | str) -> InvertedIndex:
        fields = ("indptr", "doc_ids", "weights", "block_ptr", "head", "head_slot")
        move = {f: None if getattr(self, f) is None else getattr(self, f).to(device) for f in fields}
        return InvertedIndex(**move, num_docs=self.num_docs, block_bits=self.block_bits)

    def state(self) -> dict:
        """The tensors to save (``torch.load(weights_only=True)`` reads them); not the block
        pointers nor the head, rebuilt on load."""
        return {
            "indptr": self.indptr,
            "doc_ids": self.doc_ids,
            "weights": self.weights,
            "num_docs": self.num_docs,
            "block_bits": self.block_bits,
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str, head_terms: int = 0) -> InvertedIndex:
        """The index of :meth:`state` on ``device``, block pointers (and a head of ``head_terms``
        terms, :meth:`with_head`) built there."""
        indptr, ids = state["indptr"].to(device), state["doc_ids"].to(device)
        n, bits = state["num_docs"], state["block_bits"]
        index = cls(indptr, ids, state["weights"].to(device), block_pointers(indptr, ids, n, bits), n, bits)
        return index.with_head(head_terms) if head_terms else index


def block_pointers(
    indptr: Tensor, doc_ids: Tensor, num_docs: int, block_bits: int, chunk: int = 1 << 26
) -> Tensor:
    """(V, n_blocks + 1) int64: per term, the first posting of each block of ``2^block_bits`` ids.

    Counts postings per (term, block) in chunks of ``chunk`` postings (bounded memory), then a
    cumulative sum along each term's blocks offset by ``indptr``.
    """
    vocab = indptr.numel() - 1
    n_blocks = max(1, -(-num_docs // (1 << block_bits)))
    counts = torch.zeros(vocab * n_blocks, dtype=torch.int64, device=doc_ids.device)  # (V * n_blocks,)
    for lo in range(0, doc_ids.numel(), chunk):
        pos = torch.arange(lo, min(lo + chunk, doc_ids.numel()), device=doc_ids.device)  # (c,)
        term = torch.searchsorted(indptr, pos, right=True) - 1  # (c,)
        block = doc_ids[lo : lo + chunk].to(torch.int64) >> block_bits  # (c,)
        counts += torch.bincount(term * n_blocks + block, minlength=vocab * n_blocks)
    ptr = torch.zeros(vocab, n_blocks + 1, dtype=torch.int64, device=doc_ids.device)  # (V, n_blocks + 1)
    ptr[:, 1:] = counts.view(vocab, n_blocks).cumsum(1)
    return ptr + indptr[:-1, None]


# --- input checks ----------------------------------------------------------------------------------


def check_queries(queries: Tensor, vocab_size: int, k: int) -> Tensor:
    """The queries as a float32 CSR matrix, after refusing what no kernel should see.

    Raises:
        ValueError: ``k <= 0``; not a 2-D matrix over ``vocab_size`` terms; term ids outside the
            vocabulary; NaN, infinite or negative weights -- naming the first offending query.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be a (B, V) matrix, got shape {tuple(queries.shape)}")
    if queries.shape[1] != vocab_size:
        raise ValueError(f"queries have V={queries.shape[1]} terms but the index has V={vocab_size}")
    queries = queries.to_sparse_csr() if queries.layout != torch.sparse_csr else queries
    cols, values = queries.col_indices(), queries.values()
    bad_id = (cols < 0) | (cols >= vocab_size)
    bad = bad_id | ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):  # one host sync, before any launch
        i = int(bad.nonzero()[0, 0])
        row = int(torch.searchsorted(queries.crow_indices(), i, right=True)) - 1
        what = (
            f"term id {int(cols[i])} outside [0, {vocab_size})" if bad_id[i] else f"weight {float(values[i])}"
        )
        raise ValueError(f"query {row}: {what}; weights must be finite and >= 0")
    return queries.to(torch.float32)


def _row_of_entries(csr: Tensor) -> Tensor:
    """(nnz,) int64 row of every stored entry of a CSR matrix (no host synchronisation)."""
    crow = csr.crow_indices()
    rows = torch.arange(csr.shape[0], device=crow.device)
    return torch.repeat_interleave(rows, crow.diff(), output_size=csr.values().numel())


# --- queries as rows and (query, term) pairs -------------------------------------------------------


def csr_rows(matrix: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of a CSR matrix, as a new CSR matrix (no densification)."""
    crow = matrix.crow_indices()
    hi = min(hi, matrix.shape[0])
    start, end = int(crow[lo]), int(crow[hi])
    return torch.sparse_csr_tensor(
        crow[lo : hi + 1] - start,
        matrix.col_indices()[start:end],
        matrix.values()[start:end],
        (hi - lo, matrix.shape[1]),
        check_invariants=False,
    )


def query_pairs(queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(query row, term, weight) of every non-zero of a CSR ``(B, V)`` block; (M,) each."""
    return _row_of_entries(queries), queries.col_indices().to(torch.int64), queries.values()
