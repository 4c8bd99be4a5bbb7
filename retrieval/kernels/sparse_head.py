r"""The dense head of an inverted index: its most frequent terms scored with one matrix product.

Term frequencies are Zipf-like, so the few most frequent terms hold most of the postings a query
needs (the 128 most frequent of 30,522 hold about 90% of them in the benchmark's MS MARCO-like
collection). Their weights are also kept as a dense ``(N, H)`` matrix ``head`` in the postings'
dtype (:meth:`~retrieval.kernels.inverted_index.InvertedIndex.with_head`, batched mode), and a
batch scores them with one tensor-core product per wave, :math:`\text{acc} = Q_{head}
D_{head}[lo:hi]^T` (:func:`head_scores`, the Triton kernel ``head_matmul``), which replaces the
zero-fill of the scatter step of :func:`~retrieval.kernels.sparse_topk.sparse_topk`; the scatter
then adds the other (*tail*) terms' postings only.

The dense block is read once per wave for the whole batch, where the postings of a head term are
read (and atomically added) once per query using it, so a batch uses the head only where its
head terms' postings outweigh the head by a margin (:func:`head_pays_off`). It stays exact: the
products of document weights with the query weights split into ``PARTS`` pieces of the weights'
dtype, :math:`q = 2^e (q_0 + q_1 + \dots)` (two pieces of float16, three of bfloat16, each product
exact in float32, :func:`split_queries`), summed in float32 -- the same scores to float32
rounding. Memory: ``2 N H`` bytes for float16 / bfloat16 weights (2.25 GB for ``H = 128`` at 8.8M
documents, against 5.9 GB of postings); the postings of the head terms stay in the index for the
single-query path, which reads them instead (a dense head costs ``2 N H`` bytes per query there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrieval.kernels.inverted_index import InvertedIndex
from retrieval.kernels.sparse_kernels import _kernels

PARTS = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1}  # query pieces per head dtype
HEAD_MARGIN_BYTES = 2 << 30  # head_pays_off's margin: the postings ~1.5 ms of fixed cost would scatter
# the head matmul's tile (queries x documents), warps and stages: swept on the H200 (2^21 documents,
# 1000 queries, 128 terms: 3.95 ms; 8 warps 5.4 ms, 256 documents 4.7 ms, 64 documents 4.7 ms)
_HEAD_BLOCK_M, _HEAD_BLOCK_N, _HEAD_WARPS, _HEAD_STAGES = 128, 128, 4, 3


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
