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

**Dense head** (:meth:`InvertedIndex.with_head`, batched mode). Term frequencies are Zipf-like,
so the few most frequent terms hold most of the postings a query needs (the 128 most frequent of
30,522 hold about 90% of them in the benchmark's MS MARCO-like collection). Their weights are
also kept as a dense ``(N, H)`` matrix ``head`` in the postings' dtype, and a batch scores them
with one tensor-core product per wave, :math:`\text{acc} = Q_{head} D_{head}[lo:hi]^T`, which
replaces the zero-fill of step 2; the scatter then adds the other (*tail*) terms' postings only.
The dense block is read once per wave for the whole batch, where the postings of a head term are
read (and atomically added) once per query using it, so a batch uses the head only where its
head terms' postings outweigh the head by a margin (:func:`head_pays_off`). It stays exact: the
products of document weights with the query weights split into ``PARTS`` pieces of the weights'
dtype, :math:`q = 2^e (q_0 + q_1 + \dots)` (two pieces of float16, three of bfloat16, each product
exact in float32), summed in float32 -- the same scores to float32 rounding. Memory: ``2 N H`` bytes
for float16 / bfloat16 weights (2.25 GB for ``H = 128`` at 8.8M documents, against 5.9 GB of
postings); the postings of the head terms stay in the index for the single-query path, which
reads them instead (a dense head costs ``2 N H`` bytes per query there).

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
from dataclasses import dataclass, replace
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


# --- the dense head ------------------------------------------------------------------------------

PARTS = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1}  # query pieces per head dtype
HEAD_MARGIN_BYTES = 2 << 30  # head_pays_off's margin: the postings ~1.5 ms of fixed cost would scatter


def head_queries(
    index: InvertedIndex, rows: Tensor, terms: Tensor, qw: Tensor, b: int
) -> tuple[Tensor, Tensor]:
    """The head terms' weights of ``b`` queries as ``(B, H')`` float32, and which pairs they are.

    ``rows``, ``terms``, ``qw``: (M,) the (query row, term, weight) pairs of :func:`query_pairs`.

    Returns:
        ((B, H') dense head weights, (M,) bool: the pair's term is in the head).
    """
    slot = index.head_slot[terms]  # (M,)
    is_head = slot >= 0
    width = index.head.shape[1]
    dense = torch.zeros(b * width, device=index.device)  # (B * H',)
    dense.index_put_((rows * width + slot.clamp(min=0),), qw * is_head, accumulate=True)
    return dense.view(b, width), is_head


def head_pays_off(index: InvertedIndex, terms: Tensor, margin_bytes: int = HEAD_MARGIN_BYTES) -> bool:
    """Whether the postings of the head terms among ``terms`` outweigh the dense head by ``margin_bytes``.

    ``terms``: (M,) the term of every (query, term) pair of a batch. One host synchronisation,
    unless even ``M`` posting lists as long as the collection could not outweigh the head. The
    margin stands for the hybrid path's fixed cost, about 1-2 ms a call on the H200. There,
    in batches of 32 queries, the head ran 40% faster on 8.8M documents for siamese queries
    (7.5 GB of head postings against a 2.25 GB head) and slower for inference-free ones (1.4 GB,
    7%), for siamese ones on 1M documents (0.86 GB against 0.26 GB, 40%) and on SciFact and
    NFCorpus; in batches of 1000 it was faster everywhere (from 5 GB of head postings up).
    """
    per_posting = index.doc_ids.element_size() + index.weights.element_size()
    needed = index.head.numel() * index.head.element_size() + margin_bytes
    if terms.numel() * index.num_docs * per_posting < needed:
        return False  # no sync: small collections and batches
    head_postings = (index.indptr.diff()[terms] * (index.head_slot[terms] >= 0)).sum() * per_posting
    return bool(head_postings >= needed)


def split_queries(q: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""``(B, H')`` float32 weights ``>= 0`` as ``PARTS[dtype]`` pieces of ``dtype`` and a scale per row.

    .. math::
        q_b = 2^{e_b} \sum_p q_b^{(p)}, \qquad
        q_b^{(p)} = \operatorname{round}\Big(2^{-e_b} q_b - \sum_{r < p} q_b^{(r)}\Big),

    :math:`2^{e_b}` the smallest power of two above the row's largest weight (at most
    :math:`2^{127}`), so the first piece lies in ``[0, 2)`` (in range for float16) and the others,
    rounding errors, are smaller. A piece times a document weight of ``dtype`` is exact in
    float32; the pieces keep 22 bits of each weight (float16), 24 (bfloat16) or all (float32),
    down to :math:`2^{-24}` of the row's largest weight.

    Returns:
        ((P, B, H') pieces of ``dtype``, (B,) float32 scales).
    """
    _, e = torch.frexp(q.amax(1))  # (B,) max = f 2^e with f in [0.5, 1); an empty row gives 2^0
    scale = torch.ldexp(torch.ones_like(q[:, 0]), e.clamp(-126, 127))  # (B,) a normal float32
    rest = q / scale[:, None]  # (B, H') exact: a power of two
    pieces = []
    for _ in range(PARTS[dtype]):
        pieces.append(rest.to(dtype))
        rest = rest - pieces[-1].to(torch.float32)
    return torch.stack(pieces), scale


def head_scores(index: InvertedIndex, head_q: tuple[Tensor, Tensor], acc: Tensor, lo: int) -> None:
    """Write ``acc[b, d - lo]`` = the head terms' score of document ``d`` (a Triton matmul).

    ``head_q``: :func:`split_queries` of the batch. Every column of ``acc`` is written (0 past
    ``num_docs``): this is the wave's initialisation.
    """
    pieces, scale = head_q
    b, width = acc.shape
    h = index.head.shape[1]
    block_m = min(_HEAD_BLOCK_M, max(16, 1 << (b - 1).bit_length()))
    block_k = next(s for s in (64, 32, 16) if h % s == 0)
    n_m, n_n = -(-b // block_m), -(-width // _HEAD_BLOCK_N)
    _kernels().head_matmul[(n_m * n_n,)](
        acc,
        width,
        lo,
        index.num_docs,
        pieces,
        scale,
        index.head,
        b,
        n_m,
        H=h,
        P=pieces.shape[0],
        BM=block_m,
        BN=_HEAD_BLOCK_N,
        BK=block_k,
        PRECISION="ieee" if index.head.dtype == torch.float32 else "tf32",
        num_warps=_HEAD_WARPS,
        num_stages=_HEAD_STAGES,
    )


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
# the head matmul's tile (queries x documents), warps and stages: swept on the H200 (2^21 documents,
# 1000 queries, 128 terms: 3.95 ms; 8 warps 5.4 ms, 256 documents 4.7 ms, 64 documents 4.7 ms)
_HEAD_BLOCK_M, _HEAD_BLOCK_N, _HEAD_WARPS, _HEAD_STAGES = 128, 128, 4, 3
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

    @triton.jit
    def head_matmul(
        acc,
        width,
        lo,
        n_docs,
        pieces,
        scale,
        head,
        b,
        n_m,
        H: tl.constexpr,
        P: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Program (query tile, document tile), query tiles fastest (they share the head tile in L2):
        acc[q, d] = scale[q] * sum_p pieces[p, q] . head[lo + d], float32, every (q < b, d < width)."""
        pid = tl.program_id(0)
        rm = (pid % n_m) * BM + tl.arange(0, BM)  # (BM,) queries
        rn = (pid // n_m) * BN + tl.arange(0, BN)  # (BN,) documents - lo
        doc = lo + rn.to(tl.int64)
        live_m = rm < b
        live_d = doc < n_docs
        c = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.static_range(0, H, BK):
            rk = k + tl.arange(0, BK)
            d = tl.load(head + doc[:, None] * H + rk[None, :], mask=live_d[:, None], other=0.0)  # (BN, BK)
            for p in tl.static_range(P):
                q_ptr = pieces + (p * b + rm[:, None]).to(tl.int64) * H + rk[None, :]
                q = tl.load(q_ptr, mask=live_m[:, None], other=0.0)  # (BM, BK)
                c = tl.dot(q, tl.trans(d), c, input_precision=PRECISION)
        c = c * tl.load(scale + rm, mask=live_m, other=1.0)[:, None]
        out = acc + rm[:, None].to(tl.int64) * width + rn[None, :]
        tl.store(out, c, mask=live_m[:, None] & (rn < width)[None, :])

    return SimpleNamespace(scatter=scatter, run_max=run_max, head_matmul=head_matmul)


def sparse_topk(
    index: InvertedIndex, queries: Tensor, k: int, budget_bytes: int = 1 << 30, use_head: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-``k``: the Triton kernel for an index on a GPU (with its dense head, if any), the
    torch reference on the CPU."""
    if index.device.type == "cuda":
        return sparse_topk_triton(index, queries, k, budget_bytes, use_head=use_head)
    return sparse_topk_reference(index, queries, k, budget_bytes)
