r"""Exact top-k of sparse queries over a term-major inverted index, without a (queries x docs) matrix.

The score of document :math:`d` for query :math:`q` is the sparse dot product

.. math::
    s(q, d) = \sum_{j \in q} q_j \, w_{jd},

summed over the query's terms only, so the work is the postings of those terms: what an inverted
index reads, on a GPU (Mackenzie et al., *Efficient Document-at-a-time and Score-at-a-time Query
Evaluation for Learned Sparse Representations*, TOIS 2023, https://doi.org/10.1145/3576922,
survey the CPU side; this module is score-at-a-time over the whole query batch).

The index layout (term-major postings and a block pointer table) is in
:mod:`retrieval.kernels.inverted_index`; the single-query mode, one query replayed from a CUDA
graph, in :mod:`retrieval.kernels.sparse_single`.

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
   scores (:mod:`retrieval.kernels.sparse_select`);
4. *merge* with the candidates of earlier waves: (score desc, document id asc).

**Dense head** (:meth:`~retrieval.kernels.inverted_index.InvertedIndex.with_head`, batched mode):
the most frequent terms' weights also kept as a dense ``(N, H)`` matrix, scored with one
tensor-core product per wave that replaces the zero-fill of step 2, where their postings
outweigh the head by a margin; the scatter then adds the other (*tail*) terms' postings only.
Exact to float32 rounding; details in :mod:`retrieval.kernels.sparse_head`.

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
from functools import partial

import torch
from torch import Tensor

from retrieval.eval.topk import topk_with_id_ties
from retrieval.kernels.inverted_index import InvertedIndex, check_queries, csr_rows, query_pairs
from retrieval.kernels.sparse_head import head_pays_off, head_queries, head_scores, split_queries
from retrieval.kernels.sparse_kernels import _kernels
from retrieval.kernels.sparse_select import merge_topk, pad_topk, run_maxima, unpack_keys, wave_keys

log = logging.getLogger(__name__)

_MAX_WAVE_BLOCKS = 65535  # index blocks per wave: the scatter's second grid dimension


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
    use_head: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_topk_reference` with the scatter and the run maxima as Triton kernels.

    Same arguments and results; ``select_block`` documents per run of the selection (a power of
    two dividing the index block); ``scatter_block`` postings per iteration of a scatter program
    (a power of two); ``use_head`` (bool | None, default None) whether a batch is scored with the
    index's dense head, if it has one: ``None`` where the head terms' postings outweigh the
    head (:func:`head_pays_off`, per group of queries). Runs on CUDA tensors, or on CPU
    tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).

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
    group = partial(_triton_group, select_block=select_block, scatter_block=scatter_block, use_head=use_head)
    return in_groups(group, index, queries, k, budget_bytes)


def _triton_group(
    index: InvertedIndex,
    queries: Tensor,
    k: int,
    budget_bytes: int,
    select_block: int,
    scatter_block: int,
    use_head: bool | None,
) -> tuple[Tensor, Tensor]:
    b, dev = queries.shape[0], index.device
    rows, terms, qw = query_pairs(queries)
    n_pairs = torch.full((1,), len(terms), dtype=torch.int64, device=dev)
    head_q = None
    if index.head is not None and (head_pays_off(index, terms) if use_head is None else use_head):
        dense, is_head = head_queries(index, rows, terms, qw, b)
        head_q = split_queries(dense, index.head.dtype)
        order = torch.sort(is_head.to(torch.int8), stable=True).indices  # (M,) tail pairs first, in order
        rows, terms, qw = rows[order], terms[order], qw[order]
        n_pairs = (~is_head).sum().reshape(1)  # the scatter skips the head pairs, no host sync
    best = torch.empty(b, 0, dtype=torch.int64, device=dev)  # (B, <=k) packed keys, best first
    w = wave_size(b, index.num_docs, index.block_bits, budget_bytes)
    for lo in range(0, index.num_docs, w):
        hi = min(lo + w, index.num_docs)
        pairs = (rows, terms, qw, n_pairs)
        keys = score_wave(index, pairs, b, lo, hi, k, select_block, scatter_block, head_q)
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
    head_q: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The top ``k`` documents in ``[lo, hi)`` of ``b`` queries as packed keys (:func:`wave_keys`).

    ``pairs`` = (rows, terms, weights, n_pairs): (M,) query row, term and weight of every pair,
    and a (1,) int64 device tensor counting the live ones (pairs past it are padding, or head
    terms, and add nothing: what lets a CUDA graph serve queries of any length up to ``M``).
    ``head_q``: the batch's :func:`split_queries` when the index's dense head scores its head
    terms (:func:`head_scores` then initialises the accumulators instead of a zero-fill).
    """
    rows, terms, qw, n_pairs = pairs
    width = -(-(hi - lo) // select_block) * select_block  # whole runs; the tail stays 0
    if head_q is None:
        acc = torch.zeros(b, width, device=index.device)  # (B, W)
    else:
        acc = torch.empty(b, width, device=index.device)  # (B, W)
        head_scores(index, head_q, acc, lo)
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


def sparse_topk(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int = 1 << 30, use_head: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-``k``: the Triton kernel for an index on a GPU (with its dense head, if any), the
    torch reference on the CPU."""
    if index.device.type == "cuda":
        return sparse_topk_triton(index, queries, k, budget_bytes, use_head=use_head)
    return sparse_topk_reference(index, queries, k, budget_bytes)
