"""GPU kernels (Triton), each with a pure-torch reference used on CPU and in CI.

* :mod:`retrieval.kernels.sparse_topk` -- exact top-k of sparse queries over a term-major
  inverted index, without a (queries x documents) score matrix; its parts:
  :mod:`~retrieval.kernels.inverted_index` (the index and the query checks),
  :mod:`~retrieval.kernels.sparse_head` (the dense head of frequent terms),
  :mod:`~retrieval.kernels.sparse_select` (run maxima and packed keys),
  :mod:`~retrieval.kernels.sparse_kernels` (the Triton kernels) and
  :mod:`~retrieval.kernels.sparse_single` (single-query mode, CUDA graphs);
* :mod:`retrieval.kernels.dense_topk` -- fused embedding scoring, exclusion masking and top-k;
* :mod:`retrieval.kernels.splade_head` -- the SPLADE head (vocabulary projection,
  log(1 + ReLU), masked max over tokens) without the (B, L, V) logits, forward and backward.

Triton is imported only where a kernel runs (it ships with torch's CUDA wheels). Without a GPU
the tests run the same kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``), which checks their logic but not their speed.
"""
