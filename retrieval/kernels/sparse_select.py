"""The selection step of the sparse top-k search: a wave's top ``k`` without sorting the wave.

Documents scoring 0 share no term and are dropped (as from an inverted index); the wave's top
``k`` is taken in two stages: the maximum of every run of ``select_block`` documents
(:func:`run_maxima`, the Triton kernel ``run_max``), the ``k`` best runs, then the top ``k`` of
their documents (:func:`wave_keys`). Every document of the wave's top ``k`` lies in those runs (a
run outside them has a maximum below ``k`` other documents'), so the result is exact, up to the
order of equal scores.

Candidates are packed ``(float32 score bits << 32) | (2^32 - 1 - doc id)`` into int64 keys
(:func:`pack_keys`; scores are ``>= 0``, so the bits order like the floats): one ``topk`` on the
keys is the top ``k`` by (score desc, id asc), and merging waves is one more. The torch reference
merges (score, id) lists instead (:func:`merge_topk`); both pad to ``k`` (:func:`pad_topk`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrieval.eval.topk import sort_by_score_then_id
from retrieval.kernels.sparse_kernels import _kernels

_ID_MASK = (1 << 32) - 1
_MAX_RUNS = 64  # runs per program of the run-maxima kernel


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
