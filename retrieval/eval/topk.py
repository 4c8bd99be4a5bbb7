"""Full-sort top-K for recommenders: every user is ranked against the whole item catalogue.

Conventions (Sparrow's recommender evaluation, see ``STYLE.md``):

* **Candidates** are all items minus the user's excluded items (training items, and validation items
  at test time). Excluded items are set to ``-inf`` before selection.
* **Scores are compared as float32**: ``score_fn``'s output is cast to float32 (the returned scores
  are float32 too), so two items tie exactly when their float32 scores are equal.
* **Ties are broken by item id**: among equal scores the lower item id ranks first. This is exact
  and deterministic, on CPU and on GPU, whatever ``chunk_size`` is.
* An item whose score is ``-inf`` (excluded, or scored ``-inf`` by ``score_fn``) is never returned:
  a user with fewer than ``k`` candidates gets the tail padded with item id ``-1`` and score
  ``-inf``. NaN scores raise ``ValueError``.

Memory is bounded by a few ``(chunk_size, n_items)`` blocks (the scores plus the selection's
temporaries); the ``(users, items)`` matrix is never materialised.

Tie-break implementation. Measured on this repo's 2-core CPU box (AMD EPYC, torch 2.13, 2 threads)
on one 1024 x 40,981 float32 block, k = 20, best of 3 (``benchmarks/full_sort.py`` re-measures it
and logs it in ``benchmarks/RESULTS.md``), random scores / integer scores 0..9 (ties at every cut):

* ``torch.topk`` alone: 40 / 39 ms, but the order among equal scores is unspecified;
* a stable descending ``torch.sort`` of the whole row: 1,946 / 1,039 ms;
* ``torch.topk`` on int64 keys (order-preserving float bits << 32 | reversed item id): 621 / 541 ms;
* what this module does, 43 / 209 ms: ``torch.topk(k + 1)``, then (i) sort the ``k`` winners by
  (score desc, item id asc) -- a ``(B, k)`` sort; (ii) only for the rows where the ``(k+1)``-th
  score equals the ``k``-th (a tie straddles the cut, so ``topk`` may have kept an arbitrary subset
  of the tied items), keep the items above the tied value and fill the remaining slots with the
  tied items of lowest id, found by a second ``topk`` over ``-id`` restricted to the tied items.
  Rows without a boundary tie cost one extra topk slot; fully tied blocks cost about 5x topk.

On an H200 all four take 1-3 ms per block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from retrieval.types import ItemSets

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]

_PROGRESS_MIN_CHUNKS = 8  # progress=None shows a bar only for runs with at least this many chunks


def sort_by_score_then_id(scores: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by (score descending, item id ascending).

    Args:
        scores: (B, k) float32.
        items: (B, k) int64, distinct per row.

    Returns:
        (scores, items): (B, k) each, reordered.
    """
    items, perm = torch.sort(items, dim=1)  # (B, k) by id ascending
    scores = torch.gather(scores, 1, perm)
    scores, perm = torch.sort(scores, dim=1, descending=True, stable=True)  # stable keeps id order
    return scores, torch.gather(items, 1, perm)


def topk_with_id_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k per row with ties broken by column index (lower index first).

    Args:
        scores: (B, N) float32 block; ``-inf`` marks non-candidates; must not contain NaN.
        k: number of items to keep, >= 1 (may exceed N).

    Returns:
        (values, indices): (B, k) float32 and (B, k) int64, sorted by (value desc, index asc);
        slots without a candidate hold ``-inf`` and index ``-1``.

    Raises:
        ValueError: if a row contains NaN (``torch.topk`` ranks NaN first, so it shows in column 0).
    """
    vals, idx, has_nan = _topk_with_id_ties(scores, k)
    _raise_on_nan(has_nan)
    return vals, idx


def _raise_on_nan(has_nan: torch.Tensor) -> None:
    """Raise if the () bool flag of :func:`_topk_with_id_ties` is set (a host sync on a GPU)."""
    if has_nan:
        raise ValueError("score_fn returned NaN scores; cannot rank them")


def _topk_with_id_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_with_id_ties` that reports NaN as a flag on the device instead of raising.

    Returns:
        (values, indices, has_nan): (B, k) float32, (B, k) int64 and () bool, true iff ``scores``
        holds a NaN (then the first two are meaningless). The one host sync left is the
        data-dependent look-up of the rows where a tie straddles the cut.
    """
    B, N = scores.shape
    kk = min(k + 1, N)  # one extra slot tells whether a tie straddles the k-th position
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)  # (B, kk)
    has_nan = torch.isnan(vals[:, :1]).any()  # () topk ranks NaN first
    if kk > k:
        kth = vals[:, k - 1]  # (B,) the k-th largest value
        straddle = (vals[:, k] == kth) & (kth > float("-inf"))  # (B,) tied items on both sides of the cut
        vals, idx = vals[:, :k], idx[:, :k]  # (B, k)
        rows = straddle.nonzero().squeeze(1)  # (B',)
        if rows.numel():
            t = kth[rows]  # (B',) the tied value
            block = scores if rows.numel() == B else scores[rows]  # (B', N)
            # items above t are all among topk's first n_above slots (sorted desc); the remaining
            # slots go to the tied items of lowest id: a second topk on -id over the tied ones
            n_above = (vals[rows] > t.unsqueeze(1)).sum(1, keepdim=True)  # (B', 1)
            neg_id = -torch.arange(N, device=scores.device, dtype=torch.int32)  # (N,)
            not_tied = torch.iinfo(torch.int32).min
            key = torch.where(block == t.unsqueeze(1), neg_id, not_tied)  # (B', N)
            tied_ids = torch.topk(key, k, dim=1, sorted=True).indices  # (B', k) lowest ids first
            pos = torch.arange(k, device=scores.device).unsqueeze(0)  # (1, k)
            from_tied = torch.gather(tied_ids, 1, (pos - n_above).clamp(min=0))  # (B', k)
            sel = torch.where(pos < n_above, idx[rows], from_tied)  # (B', k)
            idx[rows] = sel
            vals[rows] = torch.gather(block, 1, sel)
    vals, idx = sort_by_score_then_id(vals, idx)  # (B, <=k)
    idx = idx.masked_fill(vals == float("-inf"), -1)
    if idx.shape[1] < k:  # fewer items than k in the catalogue
        pad = k - idx.shape[1]
        vals = torch.cat([vals, vals.new_full((B, pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((B, pad), -1)], dim=1)
    return vals, idx, has_nan


def _pairs_per_chunk(sets: ItemSets, users: torch.Tensor, chunk_size: int) -> list[int]:
    """How many (user, item) pairs of ``sets`` each chunk of ``users`` has: one host read per call.

    Known on the host, these sizes spare :meth:`ItemSets.rows` its host syncs inside the chunk loop.
    """
    sizes = sets.sizes()[users.to(sets.indptr.device)]  # (U,)
    pad = -sizes.numel() % chunk_size
    return torch.nn.functional.pad(sizes, (0, pad)).view(-1, chunk_size).sum(1).tolist()  # (n_chunks,)


def full_sort_topk(
    score_fn: ScoreFn,
    users: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    out_device: torch.device | str | None = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the whole catalogue for every user and keep the top ``k``, chunk by chunk.

    For each chunk of at most ``chunk_size`` users: ``score_fn(chunk)`` gives a
    ``(B, n_items)`` block, the chunk's ``exclude`` items are set to ``-inf``, and
    :func:`topk_with_id_ties` selects the top ``k`` by (score desc, item id asc). Peak memory is
    about one score block (``chunk_size * n_items * 4`` bytes) plus the selection's temporaries.

    Args:
        score_fn: ``users (B,) int64 on device -> (B, n_items)`` scores (any float dtype, any device;
            cast to float32). Called once per chunk, under ``torch.no_grad()``. The returned block
            is masked in place, so it must be a fresh tensor (a view, such as a slice of a cached
            score matrix, is detected and copied first).
        users: (U,) int64 user ids to rank for, in output order.
        k: (int) list length, >= 1.
        exclude: (ItemSets | None) per-user items to mask with ``-inf`` (training items; plus
            validation items at test time). Default: ``None`` (no masking).
        chunk_size: (int) users per ``score_fn`` call. Default: 1024.
        device: (torch.device | str | None) where ``users`` chunks are sent before ``score_fn``;
            ``None`` keeps ``users``' device. Masking and selection run on the device of the
            scores ``score_fn`` returns; ``exclude`` is moved there once per call (not at all if it
            is there already).
        progress: (bool | None) tqdm bar over chunks; ``None`` shows it only for runs of at least
            8 chunks and only on a terminal. Default: ``None``.
        out_device: (torch.device | str | None) where the results are returned; ``None`` leaves
            them on the device of the scores. Default: ``"cpu"``.

    Returns:
        (scores, items): (U, k) float32 and (U, k) int64 on ``out_device``, row ``i`` for
        ``users[i]``; ``items[i, p]`` is the item at rank ``p + 1``; a user with fewer than ``k``
        candidates has the tail padded with item ``-1`` and score ``-inf``.

    Raises:
        ValueError: if ``score_fn`` returns NaN (checked once, after the last chunk: on a GPU the
            chunk loop then syncs with the host only where a tie straddles the k-th position).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    users = torch.as_tensor(users, dtype=torch.int64).reshape(-1)
    if device is not None:
        users = users.to(device)
    n_chunks = -(-users.numel() // chunk_size)
    if progress is None:
        disable = None if n_chunks >= _PROGRESS_MIN_CHUNKS else True  # tqdm: None = auto (TTY only)
    else:
        disable = not progress
    excl_on: dict[torch.device, ItemSets] = {}
    n_excluded = _pairs_per_chunk(exclude, users, chunk_size) if exclude is not None else []
    out_scores, out_items, nan_flags = [], [], []
    with torch.no_grad():
        for start in tqdm(
            range(0, users.numel(), chunk_size),
            total=n_chunks,
            disable=disable,
            desc="full-sort top-k",
            unit="chunk",
        ):
            chunk = users[start : start + chunk_size]  # (B,)
            scores = score_fn(chunk)  # (B, N)
            if scores.dim() != 2 or scores.shape[0] != chunk.numel():
                raise ValueError(
                    f"score_fn must return ({chunk.numel()}, n_items), got {tuple(scores.shape)}"
                )
            if exclude is not None and scores.shape[1] != exclude.num_items:
                raise ValueError(
                    f"score_fn returned {scores.shape[1]} items but exclude has {exclude.num_items}"
                )
            if scores.dtype != torch.float32:
                scores = scores.float()  # (B, N) a new tensor
            elif scores._base is not None:
                scores = scores.clone()  # a view (e.g. a slice of a cached matrix): never write through it
            if exclude is not None:
                dev = scores.device
                if dev not in excl_on:
                    excl_on[dev] = exclude.to(dev)
                n = n_excluded[start // chunk_size]
                row, item = excl_on[dev].rows(chunk.to(dev), output_size=n)  # (n,), (n,)
                scores[row, item] = float("-inf")
            vals, idx, has_nan = _topk_with_id_ties(scores, k)  # (B, k), (B, k), ()
            out_scores.append(vals)
            out_items.append(idx)
            nan_flags.append(has_nan)
            del scores
    if not out_scores:
        return (
            torch.zeros(0, k, dtype=torch.float32, device=out_device),
            torch.zeros(0, k, dtype=torch.int64, device=out_device),
        )
    _raise_on_nan(torch.stack(nan_flags).any())
    scores, items = torch.cat(out_scores), torch.cat(out_items)  # (U, k) each
    if out_device is None:
        return scores, items
    return scores.to(out_device), items.to(out_device)
