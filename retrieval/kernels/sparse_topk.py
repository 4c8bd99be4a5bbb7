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
   Triton kernel ``scatter`` (one program per (pair, index block), float32 atomic adds that stay
   in L2; no host synchronisation), or ``index_add_`` in the torch reference;
3. *select*: documents scoring 0 share no term and are dropped (as from an inverted index);
   the wave's top ``k`` is taken in two stages: the maximum of every run of ``select_block``
   documents (the Triton kernel ``run_max``), the ``k`` best runs, then the top ``k`` of their
   documents. Every document of the wave's top ``k`` lies in those runs (a run outside them has
   a maximum below ``k`` other documents'), so the result is exact, up to the order of equal
   scores;
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
from types import SimpleNamespace

import torch
from torch import Tensor

from retrieval.eval.topk import sort_by_score_then_id, topk_with_id_ties

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_WAVE_BLOCKS = 65535  # index blocks per wave: the scatter's second grid dimension


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
    blocks = min(_MAX_WAVE_BLOCKS, max(1, budget_bytes // (4 * max(batch, 1) * block)))
    return min(blocks * block, -(-num_docs // block) * block)


def segments(index: InvertedIndex, terms: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(start, end) of each term's postings with document ids in ``[lo, hi)``; (M,) int64 each.

    ``lo`` is a multiple of the block size; ``hi`` too, or ``>= num_docs``.
    """
    n_blocks = index.block_ptr.shape[1] - 1
    first = lo >> index.block_bits
    last = min(n_blocks, -(-hi // (1 << index.block_bits)))
    return index.block_ptr[terms, first], index.block_ptr[terms, last]


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
    groups = query_groups(queries.shape[0], index.block_bits, budget_bytes)
    if not groups:  # no queries
        return pad_topk(*_empty_lists(0, index.device), k)
    if len(groups) == 1:
        return score_group(index, queries, k, budget_bytes)
    parts = [score_group(index, csr_rows(queries, lo, hi), k, budget_bytes) for lo, hi in groups]
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


# --- the Triton kernels ----------------------------------------------------------------------------


def sparse_topk_triton(
    index: InvertedIndex,
    queries: Tensor,
    k: int,
    budget_bytes: int = 1 << 30,
    select_block: int = 64,
    scatter_block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_topk_reference` with the scatter and the run maxima as Triton kernels.

    Same arguments and results; ``select_block`` documents per run of the selection (a power of
    two dividing the index block); ``scatter_block`` postings per iteration of a scatter program
    (a power of two). Runs on CUDA tensors, or on CPU tensors in Triton's
    interpreter (``TRITON_INTERPRET=1``, for tests).

    The scatter launches one program per (query term, index block of the wave), ordered so that
    the programs running at once cover one index block of a few hundred queries: their atomic
    adds stay in the L2 cache. Candidates are packed ``(float32 score bits << 32) | (2^32 - 1 -
    doc id)`` into int64 keys (scores are ``>= 0``, so the bits order like the floats): one
    ``topk`` on the keys is the top ``k`` by (score desc, id asc), and merging waves is one more.
    No host synchronisation after the input check.
    """
    if select_block < 1 or (1 << index.block_bits) % select_block:
        raise ValueError(
            f"select_block must divide the index block {1 << index.block_bits}, got {select_block}"
        )
    if scatter_block < 16 or scatter_block & (scatter_block - 1):
        raise ValueError(f"scatter_block must be a power of two >= 16, got {scatter_block}")
    if index.num_docs >= 1 << 32:
        raise ValueError(f"the kernel packs document ids in 32 bits; the index has {index.num_docs:,}")
    queries = check_queries(queries, index.vocab_size, k).to(index.device)
    group = partial(_triton_group, select_block=select_block, scatter_block=scatter_block)
    return in_groups(group, index, queries, k, budget_bytes)


def _triton_group(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int, select_block: int, scatter_block: int
) -> tuple[Tensor, Tensor]:
    b, dev = queries.shape[0], index.device
    rows, terms, qw = query_pairs(queries)
    n_pairs = torch.full((1,), len(terms), dtype=torch.int64, device=dev)
    best = torch.empty(b, 0, dtype=torch.int64, device=dev)  # (B, <=k) packed keys, best first
    w = wave_size(b, index.num_docs, index.block_bits, budget_bytes)
    for lo in range(0, index.num_docs, w):
        hi = min(lo + w, index.num_docs)
        keys = score_wave(index, (rows, terms, qw, n_pairs), b, lo, hi, k, select_block, scatter_block)
        best = keys if not best.shape[1] else torch.cat([best, keys], 1).topk(k, dim=1).values
    return unpack_keys(best, k)


def score_wave(
    index: InvertedIndex,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor],
    b: int,
    lo: int,
    hi: int,
    k: int,
    select_block: int,
    scatter_block: int,
) -> Tensor:
    """The top ``k`` documents in ``[lo, hi)`` of ``b`` queries as packed keys (:func:`wave_keys`).

    ``pairs`` = (rows, terms, weights, n_pairs): (M,) query row, term and weight of every pair,
    and a (1,) int64 device tensor counting the live ones (pairs past it are padding and add
    nothing: what lets a CUDA graph serve queries of any length up to ``M``).
    """
    rows, terms, qw, n_pairs = pairs
    width = -(-(hi - lo) // select_block) * select_block  # whole runs; the tail stays 0
    acc = torch.zeros(b, width, device=index.device)  # (B, W)
    if len(terms):
        _kernels().scatter[(len(terms), -(-(hi - lo) >> index.block_bits))](
            acc,
            width,
            lo,
            rows,
            qw,
            terms,
            n_pairs,
            index.block_ptr,
            index.block_ptr.shape[1],
            lo >> index.block_bits,
            index.doc_ids,
            index.weights,
            BLOCK=scatter_block,
        )
    return wave_keys(acc, run_maxima(acc, select_block), lo, k, select_block)


class SingleQuerySearch:
    """Single-query mode: one query at a time, the whole search replayed from a CUDA graph.

    A batch of one spends most of its time launching ~40 small operations from Python; here
    they are captured once per *capacity* (the number of query terms a graph holds: the next
    power of two, at least 16) and replayed, so a query costs the input check, three copies and
    one graph launch. Queries with more terms than ``max_terms``, or a collection too large for
    one wave of ``budget_bytes``, go through :func:`sparse_topk_triton`. Off CUDA (tests, in
    Triton's interpreter) the same padded computation runs eagerly.

    Args:
        index: the inverted index (on a CUDA device for graphs).
        k: documents per query.
        budget_bytes, select_block, scatter_block: as for :func:`sparse_topk_triton`.
        max_terms: (int, default 1024) the largest capacity captured.
    """

    def __init__(
        self,
        index: InvertedIndex,
        k: int,
        budget_bytes: int = 1 << 30,
        select_block: int = 64,
        scatter_block: int = 1024,
        max_terms: int = 1024,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.index, self.k, self.max_terms = index, k, max_terms
        self.budget_bytes, self.select_block, self.scatter_block = budget_bytes, select_block, scatter_block
        self.one_wave = wave_size(1, index.num_docs, index.block_bits, budget_bytes) >= index.num_docs
        self._graphs: dict[int, tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if index.device.type == "cuda" else None

    def __call__(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """(scores, docs): (1, k) each, as :func:`sparse_topk_triton` returns for a batch of one."""
        q = check_queries(query, self.index.vocab_size, self.k).to(self.index.device)
        if q.shape[0] != 1:
            raise ValueError(f"single-query mode takes one query, got {q.shape[0]}")
        m = q.values().numel()
        if m > self.max_terms or not self.one_wave:
            return sparse_topk_triton(
                self.index, q, self.k, self.budget_bytes, self.select_block, self.scatter_block
            )
        capacity = max(16, 1 << (m - 1).bit_length())
        if capacity not in self._graphs:
            self._graphs[capacity] = self._prepare(capacity)
        graph, (terms, qw, n_pairs), out = self._graphs[capacity]
        terms[:m].copy_(q.col_indices())
        qw[:m].copy_(q.values())
        n_pairs.fill_(m)
        if graph is None:
            return unpack_keys(self._search(terms, qw, n_pairs), self.k)
        graph.replay()
        return out[0].clone(), out[1].clone()

    def _search(self, terms: Tensor, qw: Tensor, n_pairs: Tensor) -> Tensor:
        rows = torch.zeros_like(terms)
        pairs = (rows, terms, qw, n_pairs)
        n = self.index.num_docs
        return score_wave(self.index, pairs, 1, 0, n, self.k, self.select_block, self.scatter_block)

    def _prepare(self, capacity: int) -> tuple:
        """(graph or None off CUDA, the input buffers, the output tensors) for ``capacity`` terms."""
        dev = self.index.device
        inputs = (
            torch.zeros(capacity, dtype=torch.int64, device=dev),
            torch.zeros(capacity, device=dev),
            torch.zeros(1, dtype=torch.int64, device=dev),
        )
        if dev.type != "cuda":
            return None, inputs, None
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            unpack_keys(self._search(*inputs), self.k)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # graphs share memory: outputs are copied
            out = unpack_keys(self._search(*inputs), self.k)
        return graph, inputs, out


def run_maxima(acc: Tensor, select_block: int) -> Tensor:
    """(B, W / select_block) the maximum of every run of ``select_block`` documents (a Triton kernel)."""
    b, w = acc.shape
    maxima = torch.empty(b, w // select_block, device=acc.device)
    n_runs = maxima.numel()
    _kernels().run_max[(-(-n_runs // _MAX_RUNS),)](acc, maxima, n_runs, RUN=select_block, RUNS=_MAX_RUNS)
    return maxima


def wave_keys(acc: Tensor, maxima: Tensor, lo: int, k: int, select_block: int) -> Tensor:
    """The top ``k`` documents of a ``(B, W)`` accumulator block as packed keys, best first.

    Two stages: the ``k`` runs with the largest maxima hold the top ``k`` documents (a run
    outside them has a maximum below ``k`` other documents'), then the top ``k`` of those runs'
    documents by key. Zero scores (documents sharing no term) pack below every hit and are
    dropped by :func:`unpack_keys`.

    Returns:
        (B, min(k, W)) int64 keys, descending; ids offset by ``lo``.
    """
    b = acc.shape[0]
    runs = acc.view(b, -1, select_block)  # (B, R, S)
    best = maxima.topk(min(k, runs.shape[1]), dim=1, sorted=False).indices  # (B, r)
    cand = torch.gather(runs, 1, best[:, :, None].expand(-1, -1, select_block)).reshape(b, -1)  # (B, r*S)
    ids = (best[:, :, None] * select_block + torch.arange(select_block, device=acc.device)).reshape(b, -1)
    keys = pack_keys(cand, ids + lo)  # (B, r*S)
    return keys.topk(min(k, keys.shape[1]), dim=1).values


def pack_keys(scores: Tensor, docs: Tensor) -> Tensor:
    """int64 keys ordering (score desc, doc id asc) for scores ``>= 0`` and ids in ``[0, 2^32)``."""
    return (scores.view(torch.int32).to(torch.int64) << 32) | (_ID_MASK - docs)


def unpack_keys(keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(B, C)`` packed keys to (scores, ids) padded to ``(B, k)``; zero scores become empty slots."""
    scores = (keys >> 32).to(torch.int32).view(torch.float32)
    docs = _ID_MASK - (keys & _ID_MASK)
    empty = scores == 0
    return pad_topk(scores.masked_fill(empty, float("-inf")), docs.masked_fill(empty, -1), k)


_ID_MASK = (1 << 32) - 1
_MAX_RUNS = 64  # runs per program of the run-maxima kernel
_KERNELS: dict[str, object] = {}


def _kernels():
    """The Triton kernels, compiled on first use (Triton is imported only here)."""
    if "kernels" not in _KERNELS:
        _KERNELS["kernels"] = _define_kernels()
    return _KERNELS["kernels"]


def _define_kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError as err:  # pragma: no cover - CUDA builds of torch ship Triton
        raise ImportError("the sparse top-k kernel needs Triton: pip install 'sparrow-rec[kernels]'") from err

    @triton.jit
    def scatter(
        acc,
        width,
        lo,
        rows,
        qw,
        terms,
        n_pairs,
        block_ptr,
        n_cols,
        first_block,
        doc_ids,
        weights,
        BLOCK: tl.constexpr,
    ):
        """Program (pair, block): acc[row, doc - lo] += q * w over the pair's postings in that block.

        Pairs at or past ``n_pairs[0]`` are padding: their programs do nothing.
        """
        pair = tl.program_id(0)
        ptr = block_ptr + tl.load(terms + pair) * n_cols + first_block + tl.program_id(1)
        first = tl.load(ptr)
        last = tl.where(pair < tl.load(n_pairs), tl.load(ptr + 1), first)
        q = tl.load(qw + pair)
        out = acc + tl.load(rows + pair) * width - lo
        for off in range(first, last, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            live = idx < last
            doc = tl.load(doc_ids + idx, mask=live, other=0).to(tl.int64)
            wt = tl.load(weights + idx, mask=live, other=0.0).to(tl.float32)
            tl.atomic_add(out + doc, q * wt, mask=live, sem="relaxed")

    @triton.jit
    def run_max(acc, maxima, n_runs, RUN: tl.constexpr, RUNS: tl.constexpr):
        """Program p: maxima[r] = max(acc[r * RUN : (r + 1) * RUN]) for its RUNS runs."""
        r = tl.program_id(0).to(tl.int64) * RUNS + tl.arange(0, RUNS)
        live = r < n_runs
        x = tl.load(acc + r[:, None] * RUN + tl.arange(0, RUN)[None, :], mask=live[:, None], other=0.0)
        tl.store(maxima + r, tl.max(x, axis=1), mask=live)

    return SimpleNamespace(scatter=scatter, run_max=run_max)


def sparse_topk(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int = 1 << 30
) -> tuple[Tensor, Tensor]:
    """Exact top-``k``: the Triton kernel for an index on a GPU, the torch reference on the CPU."""
    if index.device.type == "cuda":
        return sparse_topk_triton(index, queries, k, budget_bytes)
    return sparse_topk_reference(index, queries, k, budget_bytes)
