"""The Triton kernels of the sparse top-k search, compiled on first use.

* ``scatter`` -- ``acc[row, doc - lo] += q * w`` over the postings of (query, term) pairs in one
  index block (:func:`~retrieval.kernels.sparse_topk.score_wave`);
* ``run_max`` -- the maximum of every run of documents
  (:func:`~retrieval.kernels.sparse_select.run_maxima`);
* ``head_matmul`` -- the dense head's scores of a wave
  (:func:`~retrieval.kernels.sparse_head.head_scores`).

Triton is imported only here, when a kernel first runs; without a GPU the kernels run in Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from types import SimpleNamespace

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
