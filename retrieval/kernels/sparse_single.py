"""Single-query mode of the sparse top-k search: the whole search replayed from a CUDA graph."""

from __future__ import annotations

import torch
from torch import Tensor

from retrieval.kernels.inverted_index import InvertedIndex, check_queries
from retrieval.kernels.sparse_select import unpack_keys
from retrieval.kernels.sparse_topk import score_wave, sparse_topk_triton, wave_size


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
