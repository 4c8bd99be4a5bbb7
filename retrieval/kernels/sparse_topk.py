r"""Exact top-k of sparse queries over a term-major inverted index, without a (queries x docs) matrix.

The score of document :math:`d` for query :math:`q` is the sparse dot product

.. math::
    s(q, d) = \sum_{j \in q} q_j \, w_{jd},

summed over the query's terms only, so the work is the postings of those terms: what an inverted
index reads, on a GPU (Mackenzie et al., *Efficient Document-at-a-time and Score-at-a-time Query
Evaluation for Learned Sparse Representations*, TOIS 2023, https://doi.org/10.1145/3576922,
survey the CPU side; this module is score-at-a-time over the whole query batch).

**Layout** (:class:`InvertedIndex`): term-major CSC -- per term :math:`j`, the ids (int32) and
weights (float16 / bfloat16 / float32) of its documents, sorted by document id, at
``indptr[j]:indptr[j + 1]``; and a block pointer table ``block_ptr`` (V, n_blocks + 1) giving, for
every term and every block of ``2^block_bits`` document ids, where that block's postings start, so
a document range's part of any posting list is found without a search.

**Algorithm** (:func:`sparse_topk`). The documents are cut into *waves* of consecutive ids, as
many as ``budget_bytes`` of float32 accumulators hold for the whole query batch (all documents
for a single query); a batch too large for even one index block per wave is scored in groups of
queries. A small budget keeps the accumulators in the GPU's L2 cache, where the atomic adds are
cheap; a large one means fewer, larger steps. Per wave ``[lo, hi)``:

1. *segments*: for every (query, term) pair, the slice of the term's postings inside the wave
   (two reads of ``block_ptr``);
2. *scatter*: ``acc[b, doc - lo] += q_bj * w_jd`` for every posting of every segment -- the
   Triton kernel :func:`_scatter_kernel` (one program per slice of a segment, float32 atomic
   adds; no host synchronisation), or ``index_add_`` in the torch reference;
3. *select*: documents scoring 0 share no term and are dropped (as from an inverted index);
   the wave's top ``k`` is taken in two stages: the maximum of every run of ``select_block``
   documents, the ``k`` best runs, then the top ``k`` of their documents. Every document of the
   wave's top ``k`` lies in those runs (a run outside them has a maximum below ``k`` other
   documents'), so the result is exact, up to the order of equal scores;
4. *merge* with the candidates of earlier waves: (score desc, document id asc).

Only ``batch x wave`` accumulators exist at once; the ``batch x documents`` matrix never does.
:func:`sparse_topk_reference` is the same computation in plain torch (steps 2 and 3 replaced by
``index_add_`` and :func:`~retrieval.eval.topk.topk_with_id_ties`), used on the CPU and to test
the kernel; both take the same inputs and return the same outputs.

Conventions: scores are float32 (weights are widened before the multiply); a query gets fewer
than ``k`` documents when fewer share a term with it (the tail holds id ``-1`` and score
``-inf``); among equal scores at the ``k``-th place the reference keeps the lower document id,
the kernel may keep another of the tied documents (atomic adds also sum in any order, so scores
agree to float32 rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from retrieval.eval.topk import sort_by_score_then_id, topk_with_id_ties

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SCATTER_BLOCK = 1024  # postings per program iteration


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
    """

    indptr: Tensor
    doc_ids: Tensor
    weights: Tensor
    block_ptr: Tensor
    num_docs: int
    block_bits: int

    @property
    def vocab_size(self) -> int:
        return self.indptr.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    @property
    def nbytes(self) -> int:
        """Bytes of the postings (ids and weights) plus the pointer tables."""
        return sum(
            t.numel() * t.element_size() for t in (self.indptr, self.doc_ids, self.weights, self.block_ptr)
        )

    @classmethod
    def from_csr(
        cls, docs: Tensor, dtype: torch.dtype = torch.float16, block_bits: int = 16
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
        move = {f: getattr(self, f).to(device) for f in ("indptr", "doc_ids", "weights", "block_ptr")}
        return InvertedIndex(**move, num_docs=self.num_docs, block_bits=self.block_bits)

    def state(self) -> dict:
        """The tensors to save (``torch.load(weights_only=True)`` reads them); not the block pointers."""
        return {
            "indptr": self.indptr,
            "doc_ids": self.doc_ids,
            "weights": self.weights,
            "num_docs": self.num_docs,
            "block_bits": self.block_bits,
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str) -> InvertedIndex:
        """The index of :meth:`state` on ``device``, block pointers rebuilt there."""
        indptr, ids = state["indptr"].to(device), state["doc_ids"].to(device)
        n, bits = state["num_docs"], state["block_bits"]
        return cls(indptr, ids, state["weights"].to(device), block_pointers(indptr, ids, n, bits), n, bits)


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
    rows = _row_of_entries(queries)
    bad_id = (cols < 0) | (cols >= vocab_size)
    bad_weight = ~torch.isfinite(values) | (values < 0)
    if bool((bad_id | bad_weight).any()):  # one host sync, before any launch
        i = int((bad_id | bad_weight).nonzero()[0, 0])
        what = (
            f"term id {int(cols[i])} outside [0, {vocab_size})" if bad_id[i] else f"weight {float(values[i])}"
        )
        raise ValueError(f"query {int(rows[i])}: {what}; weights must be finite and >= 0")
    return queries.to(torch.float32)


def _row_of_entries(csr: Tensor) -> Tensor:
    """(nnz,) int64 row of every stored entry of a CSR matrix."""
    crow = csr.crow_indices()
    return torch.repeat_interleave(torch.arange(csr.shape[0], device=crow.device), crow.diff())


# --- the shared steps ------------------------------------------------------------------------------


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


def wave_size(batch: int, num_docs: int, block_bits: int, budget_bytes: int) -> int:
    """Documents per wave: a multiple of the index block, at most ``budget_bytes`` of accumulators."""
    block = 1 << block_bits
    blocks = max(1, budget_bytes // (4 * max(batch, 1) * block))
    return min(blocks * block, -(-num_docs // block) * block)


def segments(index: InvertedIndex, terms: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(start, end) of each term's postings with document ids in ``[lo, hi)``; (M,) int64 each.

    ``lo`` is a multiple of the block size; ``hi`` too, or ``>= num_docs``.
    """
    n_blocks = index.block_ptr.shape[1] - 1
    first = lo >> index.block_bits
    last = min(n_blocks, -(-hi // (1 << index.block_bits)))
    return index.block_ptr[terms, first], index.block_ptr[terms, last]


def select_wave(acc: Tensor, lo: int, k: int, select_block: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of a ``(B, W)`` accumulator block by the two-stage run selection; zeros dropped.

    ``W`` must be a multiple of ``select_block``. One read of the block (the run maxima); scores
    are ``>= 0``, so a run of zeros is never chosen over a run with a hit, and the zeros among
    the chosen runs' documents are dropped there, on the small candidate block.

    Returns:
        (scores, doc ids): (B, k') float32 and int64, ``k' = min(k, W)``; ids offset by ``lo``,
        ``-1`` (score ``-inf``) in empty slots.
    """
    b, w = acc.shape
    runs = acc.view(b, w // select_block, select_block)  # (B, R, S)
    n_runs = min(k, runs.shape[1])
    best = runs.amax(2).topk(n_runs, dim=1).indices  # (B, n_runs) the runs holding the top k
    cand = torch.gather(runs, 1, best[:, :, None].expand(-1, -1, select_block))  # (B, n_runs, S)
    cand = cand.reshape(b, -1)
    ids = (best[:, :, None] * select_block + torch.arange(select_block, device=acc.device)).reshape(b, -1)
    vals, pos = topk_with_id_ties(cand.masked_fill_(cand == 0, float("-inf")), min(k, cand.shape[1]))
    docs = torch.gather(ids, 1, pos.clamp(min=0)) + lo  # (B, k')
    return vals, docs.masked_fill_(pos < 0, -1)


def merge_topk(scores: Tensor, docs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of candidate lists ``(B, C)`` by (score desc, doc id asc), cut or padded to ``k``.

    Empty slots (id -1, score -inf) sort last.
    """
    key = torch.where(docs < 0, torch.iinfo(torch.int64).max, docs)  # (B, C) empties last
    scores, key = sort_by_score_then_id(scores, key)
    return pad_topk(scores, key.masked_fill_(scores == float("-inf"), -1), k)


def pad_topk(scores: Tensor, docs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(B, C)`` lists cut or padded (score ``-inf``, id ``-1``) to ``(B, k)``."""
    b, c = scores.shape
    if c >= k:
        return scores[:, :k], docs[:, :k]
    return (
        torch.cat([scores, scores.new_full((b, k - c), float("-inf"))], 1),
        torch.cat([docs, docs.new_full((b, k - c), -1)], 1),
    )


def _empty_lists(b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(b, 0, device=device), torch.empty(b, 0, dtype=torch.int64, device=device)


def query_groups(n_queries: int, block_bits: int, budget_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of a query batch, each small enough for one index block of accumulators."""
    group = max(1, budget_bytes // (4 << block_bits))
    return [(lo, min(lo + group, n_queries)) for lo in range(0, n_queries, group)]


def in_groups(score_group, index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int):
    """``score_group(index, rows, k, budget_bytes)`` over :func:`query_groups`, results concatenated."""
    parts = [
        score_group(index, csr_rows(queries, lo, hi), k, budget_bytes)
        for lo, hi in query_groups(queries.shape[0], index.block_bits, budget_bytes)
    ]
    if not parts:  # no queries
        return pad_topk(*_empty_lists(0, index.device), k)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --- the torch reference ---------------------------------------------------------------------------


def sparse_topk_reference(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int = 1 << 30
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` documents of each query in plain torch (any device); see the module docstring.

    Args:
        index: the inverted index.
        queries: (B, V) sparse CSR or dense query weights, finite and ``>= 0``.
        k: documents per query, ``>= 1``.
        budget_bytes: (int, default 1 GiB) bytes of float32 accumulators at once: a wave spans
            as many documents as fit for the whole batch, and a batch too large for one index
            block of documents is scored in groups of queries (:func:`query_groups`).

    Returns:
        (scores, docs): (B, k) float32 and (B, k) int64 document ids by (score desc, id asc);
        ``-inf`` / ``-1`` where fewer than ``k`` documents share a term with the query.

    Raises:
        ValueError: bad queries or ``k`` (:func:`check_queries`).
    """
    queries = check_queries(queries, index.vocab_size, k).to(index.device)
    return in_groups(_reference_group, index, queries, k, budget_bytes)


def _reference_group(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int
) -> tuple[Tensor, Tensor]:
    b, dev = queries.shape[0], index.device
    rows, terms, qw = query_pairs(queries)
    best = _empty_lists(b, dev)
    w = wave_size(b, index.num_docs, index.block_bits, budget_bytes)
    for lo in range(0, index.num_docs, w):
        hi = min(lo + w, index.num_docs)
        start, end = segments(index, terms, lo, hi)
        lengths = end - start  # (M,)
        pair = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths)  # (n,)
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (n,)
        pos = start[pair] + torch.arange(pair.numel(), device=dev) - first  # (n,) posting positions
        acc = torch.zeros(b, hi - lo, device=dev)  # (B, W)
        flat = rows[pair] * (hi - lo) + (index.doc_ids[pos].to(torch.int64) - lo)  # (n,)
        acc.view(-1).index_add_(0, flat, qw[pair] * index.weights[pos].to(torch.float32))
        vals, idx = topk_with_id_ties(acc.masked_fill_(acc == 0, float("-inf")), k)  # (B, k)
        docs = torch.where(idx >= 0, idx + lo, -1)
        best = merge_topk(torch.cat([best[0], vals], 1), torch.cat([best[1], docs], 1), k)
    return pad_topk(*best, k)


# --- the Triton kernel -----------------------------------------------------------------------------


def sparse_topk_triton(
    index: InvertedIndex,
    queries: Tensor,
    k: int,
    budget_bytes: int = 1 << 30,
    select_block: int = 64,
    programs: int = 1 << 15,
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_topk_reference` with the scatter as a Triton kernel and the two-stage selection.

    Same arguments and results; ``select_block`` documents
    per run of the selection (a power of two dividing the index block); ``programs`` the
    number of programs a scatter launch aims at (each (query, term) segment is split over
    ``programs / segments`` of them, a power of two, so long posting lists spread over the GPU).
    Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for
    tests).
    """
    if select_block < 1 or (1 << index.block_bits) % select_block:
        raise ValueError(
            f"select_block must divide the index block {1 << index.block_bits}, got {select_block}"
        )
    queries = check_queries(queries, index.vocab_size, k).to(index.device)
    group = partial(_triton_group, select_block=select_block, programs=programs)
    return in_groups(group, index, queries, k, budget_bytes)


def _triton_group(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int, select_block: int, programs: int
) -> tuple[Tensor, Tensor]:
    b, dev = queries.shape[0], index.device
    rows, terms, qw = query_pairs(queries)
    scatter = _scatter_kernel()
    best = _empty_lists(b, dev)
    w = wave_size(b, index.num_docs, index.block_bits, budget_bytes)
    split = _split(len(terms), programs)
    for lo in range(0, index.num_docs, w):
        hi = min(lo + w, index.num_docs)
        width = -(-(hi - lo) // select_block) * select_block  # whole runs; the tail stays 0
        acc = torch.zeros(b, width, device=dev)  # (B, W)
        if len(terms):
            start, end = segments(index, terms, lo, hi)
            scatter[(len(terms), split)](
                acc,
                width,
                lo,
                rows,
                qw,
                start,
                end,
                index.doc_ids,
                index.weights,
                split,
                BLOCK=_SCATTER_BLOCK,
            )
        vals, docs = select_wave(acc, lo, k, select_block)
        best = merge_topk(torch.cat([best[0], vals], 1), torch.cat([best[1], docs], 1), k)
    return pad_topk(*best, k)


def _split(pairs: int, programs: int) -> int:
    """Programs per (query, term) segment: a power of two giving about ``programs`` in all."""
    want = max(1, programs // max(pairs, 1))
    return min(4096, 1 << (want.bit_length() - 1))


_KERNELS: dict[str, object] = {}


def _scatter_kernel():
    """The Triton scatter kernel, compiled on first use (Triton is imported only here)."""
    if "scatter" not in _KERNELS:
        _KERNELS["scatter"] = _define_scatter_kernel()
    return _KERNELS["scatter"]


def _define_scatter_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError as err:  # pragma: no cover - CUDA builds of torch ship Triton
        raise ImportError("the sparse top-k kernel needs Triton: pip install 'sparrow-rec[kernels]'") from err

    @triton.jit
    def scatter(acc, width, lo, rows, qw, start, end, doc_ids, weights, split, BLOCK: tl.constexpr):
        """Program (pair, part): acc[row, doc - lo] += q * w over part's slices of the pair's segment."""
        pair = tl.program_id(0)
        part = tl.program_id(1)
        row = tl.load(rows + pair)
        q = tl.load(qw + pair)
        first = tl.load(start + pair)
        last = tl.load(end + pair)
        out = acc + row * width - lo
        for off in range(first + part * BLOCK, last, split * BLOCK):
            idx = off + tl.arange(0, BLOCK)
            live = idx < last
            doc = tl.load(doc_ids + idx, mask=live, other=0).to(tl.int64)
            wt = tl.load(weights + idx, mask=live, other=0.0).to(tl.float32)
            tl.atomic_add(out + doc, q * wt, mask=live, sem="relaxed")

    return scatter


def sparse_topk(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int = 1 << 30
) -> tuple[Tensor, Tensor]:
    """Exact top-``k``: the Triton kernel for an index on a GPU, the torch reference on the CPU."""
    if index.device.type == "cuda":
        return sparse_topk_triton(index, queries, k, budget_bytes)
    return sparse_topk_reference(index, queries, k, budget_bytes)
