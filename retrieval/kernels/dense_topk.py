r"""Fused dense scoring, exclusion masking and top-k: the (queries x items) matrix never exists.

For queries :math:`Q \in \mathbb{R}^{B \times d}` (users, or encoded queries) and items
:math:`E \in \mathbb{R}^{N \times d}` (items, or documents), each query :math:`b` gets

.. math::
    \operatorname{top}_k \{\, (s_{bi}, i) : i \notin X_b \,\}, \qquad s_{bi} = \mathbf{q}_b^\top \mathbf{e}_i

with :math:`X_b` the query's excluded items (a user's training items) -- full-sort evaluation of
BPR-MF / LightGCN (``\hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i``) and exact dense retrieval.

Conventions: those of :mod:`retrieval.eval.topk` (Sparrow's full-sort top-K).

* Scores are the float32 dot products of the embeddings: float16/bfloat16 embeddings are
  multiplied exactly (their products fit float32) and summed in float32.
* Ranking is by (score desc, item id asc), scores compared as float32 (``-0.0`` ties ``0.0``).
* Excluded items, and items scored ``-inf``, are never returned; a query with fewer than ``k``
  candidates gets the tail padded with item ``-1`` and score ``-inf``.

Two paths with that one contract:

* :func:`dense_topk_reference` (pure torch; CPU and CI): tiles of ``(query_chunk, item_chunk)``
  scores, each reduced to its top ``k`` by :func:`~retrieval.eval.topk.topk_with_id_ties` and
  merged into a running ``(query_chunk, k)`` list;
* :func:`dense_topk_triton` (CUDA): one Triton kernel, then a small torch merge.

Kernel design. Each program owns ``BLOCK_Q`` queries and one contiguous split of the item tiles
(splits add programs when there are few query blocks). Per ``BLOCK_N``-item tile it computes the
``(BLOCK_Q, BLOCK_N)`` score tile with ``tl.dot`` (float32 accumulate; IEEE float32 products for
float32 inputs, not TF32), masks the excluded pairs and keeps a running top ``k`` per query in
registers; only ``(B, splits, k)`` candidates reach global memory, then ``torch.topk`` over the
``splits * k`` candidates of each query. Details:

* **Exact ties without a sort.** Each (score, item) pair is packed into one int64 key,
  ``(order-preserving int32 of the float32 bits) << 32 | (2**31 - 1 - item)``: keys are distinct
  and their order is exactly (score desc, item id asc), so "largest key" is the whole rule.
* **Running top-k by threshold insertion.** A query's list holds ``k`` keys; its minimum is the
  threshold. A tile's keys above the threshold are inserted one at a time (row max replaces row
  min) until no row has one left. The first tile costs ``k`` insertions; later ones few, since a
  random order inserts about ``k (1 + ln(N / k))`` items per query in all.
* **Masking from CSR.** Each query's excluded ids are sorted; a per-query pointer (started by a
  ``searchsorted`` in torch at its split's first item) walks them tile by tile, so a tile costs
  one ``(BLOCK_Q, BLOCK_N)`` compare per excluded item of its busiest query.

Where time should go (not yet measured on a GPU: ``benchmarks/dense_topk.py`` does it): the
``tl.dot`` is a small part at d = 64; each insertion round costs a row max, an argmin and two
selects over the tile, so the first tiles of each split (about ``k`` rounds each) dominate, and
more splits mean more of those warm-up rounds. The ``(B, splits, k)`` int64 buffer is the only
global write; checked to compile for sm_90 with Triton 3.9, run so far only in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from retrieval.eval.topk import sort_by_score_then_id, topk_with_id_ties
from retrieval.types import ItemSets

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMPTY = tl.constexpr(-(2**63) + 1)  # int64 key below every (score, item) key: an unused slot
FULL = tl.constexpr(2**63 - 1)  # int64 key above every real key: a slot beyond k, never the minimum
ID_BASE = tl.constexpr(2**31 - 1)  # low 32 bits of a key: ID_BASE - item, so a lower id gives a larger key
MAX_TRITON_K = 512  # the running lists live in registers; a larger k runs the reference on the GPU


def check_inputs(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    users: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate the arguments of :func:`dense_topk` before anything is launched.

    Args:
        queries: (B, d) float32/float16/bfloat16.
        items: (N, d), same dtype and device as ``queries``.
        k: (int) list length, >= 1.
        exclude: (ItemSets | None) per-user items to mask, over ``N`` items.
        users: (B,) int64 rows of ``exclude`` for the queries, or ``None`` (then query ``b`` is
            user ``b`` and ``exclude`` must have exactly ``B`` users).

    Returns:
        (B,) int64 user ids on the queries' device (``arange(B)`` when ``users`` is ``None``).

    Raises:
        ValueError: on ``k <= 0``, a shape, dtype or device mismatch, NaN or infinite embeddings,
            or user ids outside ``exclude``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if queries.dim() != 2 or items.dim() != 2:
        raise ValueError(
            f"queries and items must be 2-D, got {tuple(queries.shape)} and {tuple(items.shape)}"
        )
    if queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"embedding dimensions differ: queries d={queries.shape[1]}, items d={items.shape[1]}"
        )
    if queries.dtype not in _DTYPES or items.dtype != queries.dtype:
        raise ValueError(
            f"queries and items must share one dtype of {_DTYPES}, got {queries.dtype} and {items.dtype}"
        )
    if queries.device != items.device:
        raise ValueError(f"queries ({queries.device}) and items ({items.device}) must be on one device")
    if items.shape[0] >= ID_BASE.value:
        raise ValueError(f"at most {ID_BASE.value - 1} items are supported, got {items.shape[0]}")
    for name, x in (("queries", queries), ("items", items)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contain NaN or infinite values; cannot rank them")
    if users is None:
        if exclude is not None and exclude.num_users != queries.shape[0]:
            raise ValueError(
                f"exclude has {exclude.num_users} users but there are {queries.shape[0]} queries: pass users="
            )
        return torch.arange(queries.shape[0], device=queries.device)
    users = torch.as_tensor(users, dtype=torch.int64, device=queries.device).reshape(-1)
    if users.numel() != queries.shape[0]:
        raise ValueError(f"users has {users.numel()} ids for {queries.shape[0]} queries")
    if exclude is not None:
        if users.numel() and (users.min() < 0 or users.max() >= exclude.num_users):
            raise ValueError(f"user ids must be in [0, {exclude.num_users}) (the users of exclude)")
    return users


def _check_exclude(exclude: ItemSets | None, n_items: int) -> None:
    if exclude is not None and exclude.num_items != n_items:
        raise ValueError(f"exclude covers {exclude.num_items} items but there are {n_items}")


def _empty_result(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) scores ``-inf`` and items ``-1``: lists with no candidate."""
    return (
        torch.full((n, k), float("-inf"), device=device),
        torch.full((n, k), -1, dtype=torch.int64, device=device),
    )


# ---------------------------------------------------------------------------------------------
# Reference path (pure torch)
# ---------------------------------------------------------------------------------------------


def _merge_topk(
    vals: torch.Tensor, ids: torch.Tensor, new_vals: torch.Tensor, new_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (B, *) lists into the best ``k`` by (score desc, item id asc).

    Item ``-1`` (padding) carries score ``-inf`` and stays at the tail.
    """
    vals, ids = sort_by_score_then_id(torch.cat([vals, new_vals], 1), torch.cat([ids, new_ids], 1))
    return vals[:, :k], ids[:, :k]  # (B, k)


def _reference_block(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    excluded: tuple[torch.Tensor, torch.Tensor] | None,
    item_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of one block of queries, streaming ``item_chunk`` items at a time.

    Args:
        queries: (B, d).
        items: (N, d).
        excluded: (row, item) pairs to mask, (n,) int64 each, or ``None``.

    Returns:
        (scores, ids): (B, k) float32 and (B, k) int64.
    """
    q = queries.float()  # (B, d)
    vals, ids = _empty_result(q.shape[0], k, q.device)
    for start in range(0, items.shape[0], item_chunk):
        stop = min(start + item_chunk, items.shape[0])
        scores = q @ items[start:stop].float().T  # (B, C) the only score block
        if excluded is not None:
            row, item = excluded
            here = (item >= start) & (item < stop)
            scores[row[here], item[here] - start] = float("-inf")
        v, i = topk_with_id_ties(scores, k)  # (B, k) ids within the chunk, -1 for padding
        i = torch.where(i >= 0, i + start, i)
        vals, ids = _merge_topk(vals, ids, v, i, k)
    return vals, ids


def dense_topk_reference(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    users: torch.Tensor | None = None,
    query_chunk: int = 1024,
    item_chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` items per query by dot product, in pure torch, tile by tile.

    Memory is bounded by one ``(query_chunk, item_chunk)`` float32 score block and its selection.

    Args:
        queries: (B, d) float32/float16/bfloat16 query (user) embeddings.
        items: (N, d) item (document) embeddings, same dtype and device.
        k: (int) list length, >= 1 (may exceed N).
        exclude: (ItemSets | None) per-user items never returned (training items). Default: ``None``.
        users: (B,) int64 row of ``exclude`` for each query; ``None`` means query ``b`` is user ``b``.
        query_chunk: (int) queries per block. Default: 1024.
        item_chunk: (int) items per block. Default: 8192.

    Returns:
        (scores, ids): (B, k) float32 and (B, k) int64 on the queries' device, sorted by
        (score desc, item id asc); missing candidates are ``-inf`` / ``-1``.
    """
    users = check_inputs(queries, items, k, exclude, users)
    _check_exclude(exclude, items.shape[0])
    if query_chunk < 1 or item_chunk < 1:
        raise ValueError(f"query_chunk and item_chunk must be >= 1, got {query_chunk} and {item_chunk}")
    excl = exclude.to(queries.device) if exclude is not None else None
    out_vals, out_ids = [], []
    with torch.no_grad():
        for start in range(0, queries.shape[0], query_chunk):
            chunk = users[start : start + query_chunk]  # (Bq,)
            pairs = excl.rows(chunk) if excl is not None else None  # (n,), (n,)
            v, i = _reference_block(queries[start : start + query_chunk], items, k, pairs, item_chunk)
            out_vals.append(v)
            out_ids.append(i)
    if not out_vals:
        return _empty_result(0, k, queries.device)
    return torch.cat(out_vals), torch.cat(out_ids)  # (B, k) each


# ---------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------


@triton.jit
def _insert(best, thr, cand, slot):
    """Move the keys of ``cand`` (BQ, BN) above each row's threshold into ``best`` (BQ, KP).

    One key per row and round: the row's largest candidate replaces its smallest kept key.
    """
    m = tl.max(cand, axis=1)  # (BQ,)
    while tl.max((m > thr).to(tl.int32), axis=0) > 0:
        pos = tl.argmin(best, axis=1)  # (BQ,) the slot of the threshold
        put = (slot[None, :] == pos[:, None]) & (m > thr)[:, None]  # (BQ, KP)
        best = tl.where(put, m[:, None], best)
        thr = tl.min(best, axis=1)
        cand = tl.where(cand < m[:, None], cand, EMPTY)  # drop the inserted key (keys are distinct)
        m = tl.max(cand, axis=1)
    return best, thr


@triton.jit
def _excluded(ex_ids_ptr, ex_pos, ex_end, cols, tile_end, BIG: tl.constexpr):
    """(BQ, BN) mask of the tile's excluded pairs; advances each row's CSR pointer past the tile."""
    nxt = tl.load(ex_ids_ptr + ex_pos, mask=ex_pos < ex_end, other=BIG)  # (BQ,) next excluded id
    hit = (nxt[:, None] < 0) & (cols[None, :] < 0)  # (BQ, BN) all false
    while tl.max((nxt < tile_end).to(tl.int32), axis=0) > 0:
        here = nxt < tile_end  # (BQ,)
        hit = hit | ((cols[None, :] == nxt[:, None]) & here[:, None])
        ex_pos += here.to(tl.int64)
        nxt = tl.load(ex_ids_ptr + ex_pos, mask=ex_pos < ex_end, other=BIG)
    return hit, ex_pos


@triton.jit
def _dense_topk_kernel(  # one program: BLOCK_Q queries x one split of the item tiles
    q_ptr,
    it_ptr,
    ex_ids_ptr,
    ex_start_ptr,
    ex_end_ptr,
    out_ptr,
    B,
    N,
    D,
    tiles_per_split,
    stride_qb,
    stride_qd,
    stride_in,
    stride_id,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,)
    row_ok = rows < B
    slot = tl.arange(0, KP)  # (KP,)
    best = tl.where(slot[None, :] < K, EMPTY, FULL) + tl.zeros((BLOCK_Q, KP), tl.int64)  # (BQ, KP)
    thr = tl.min(best, axis=1)  # (BQ,)
    if HAS_EXCL:
        ex_pos = tl.load(ex_start_ptr + rows.to(tl.int64) * n_splits + split, mask=row_ok, other=0)
        ex_end = tl.load(ex_end_ptr + rows, mask=row_ok, other=0)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first, last):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)  # (BD,)
            q = tl.load(
                q_ptr + rows[:, None].to(tl.int64) * stride_qb + dd[None, :] * stride_qd,
                mask=row_ok[:, None] & (dd < D)[None, :],
                other=0.0,
            )  # (BQ, BD)
            e = tl.load(
                it_ptr + cols[None, :].to(tl.int64) * stride_in + dd[:, None] * stride_id,
                mask=col_ok[None, :] & (dd < D)[:, None],
                other=0.0,
            )  # (BD, BN)
            if IEEE:
                acc = tl.dot(q, e, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, e, acc)
        acc = tl.where(acc == 0.0, 0.0, acc)  # -0.0 ties 0.0
        bits = acc.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # (BQ, BN) int32 in the order of the floats
        key = (ordered.to(tl.int64) << 32) | (cols.to(tl.int64) * -1 + ID_BASE)[None, :]  # (BQ, BN)
        ok = row_ok[:, None] & col_ok[None, :] & (acc > float("-inf"))
        if HAS_EXCL:
            hit, ex_pos = _excluded(ex_ids_ptr, ex_pos, ex_end, cols, (tile + 1) * BLOCK_N, ID_BASE)
            ok = ok & ~hit
        cand = tl.where(ok & (key > thr[:, None]), key, EMPTY)  # (BQ, BN)
        best, thr = _insert(best, thr, cand, slot)
    out = out_ptr + (rows[:, None].to(tl.int64) * n_splits + split) * K + slot[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slot < K)[None, :])


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack int64 keys into (float32 scores, int64 ids); ``EMPTY`` becomes (-inf, -1)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    empty = keys == EMPTY.value
    scores = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    ids = (ID_BASE.value - (keys & 0xFFFFFFFF)).masked_fill(empty, -1)
    return scores, ids


def _exclusion_pointers(
    exclude: ItemSets, users: torch.Tensor, split_starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each (query, split) starts in ``exclude.indices``, and where each query's set ends.

    Returns:
        (starts, ends): (B, S) and (B,) int64 positions into ``exclude.indices``.
    """
    keys = exclude.row_ids() * exclude.num_items + exclude.indices  # (nnz,) ascending
    first = users.unsqueeze(1) * exclude.num_items + split_starts.unsqueeze(0)  # (B, S)
    return torch.searchsorted(keys, first).contiguous(), exclude.indptr[users + 1].contiguous()


def _num_splits(n_query_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Item splits per query block so that the grid fills the GPU about four times over."""
    if device.type != "cuda":
        return min(n_tiles, 2)  # the interpreter: exercise the cross-split merge, cheaply
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-target // n_query_blocks)))


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def dense_topk_triton(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    users: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int = 128,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dense_topk_reference`'s contract, computed by the fused Triton kernel.

    Args:
        queries, items, k, exclude, users: as for :func:`dense_topk_reference`; ``k`` at most
            :data:`MAX_TRITON_K`.
        block_q: (int | None) queries per program, a power of two >= 16; ``None``: 32, or 16 for
            ``k > 128`` (the running lists, ``block_q * k`` int64, live in registers). Default: ``None``.
        block_n: (int) items per tile, a power of two >= 16. Default: 128.
        splits: (int | None) item splits per query block (more programs, each with its own
            list); ``None`` picks enough to fill the GPU. Default: ``None``.

    Returns:
        (scores, ids): (B, k) float32 and (B, k) int64 on the queries' device.
    """
    users = check_inputs(queries, items, k, exclude, users)
    _check_exclude(exclude, items.shape[0])
    if k > MAX_TRITON_K:
        raise ValueError(f"the Triton kernel keeps at most k={MAX_TRITON_K} per query, got {k}")
    B, N = queries.shape[0], items.shape[0]
    block_q = block_q or (32 if k <= 128 else 16)
    if B == 0 or N == 0:
        return _empty_result(B, k, queries.device)
    n_qblocks, n_tiles = -(-B // block_q), -(-N // block_n)
    n_splits = min(splits or _num_splits(n_qblocks, n_tiles, queries.device), n_tiles)
    tiles_per_split = -(-n_tiles // n_splits)
    n_splits = -(-n_tiles // tiles_per_split)  # no empty split
    device = queries.device
    if exclude is not None:
        excl = exclude.to(device)
        split_starts = torch.arange(n_splits, device=device) * (tiles_per_split * block_n)  # (S,)
        starts, ends = _exclusion_pointers(excl, users, split_starts)  # (B, S), (B,)
        ex_ids = excl.indices
    else:
        ex_ids = starts = ends = torch.zeros(1, dtype=torch.int64, device=device)
    out = torch.empty(B, n_splits, k, dtype=torch.int64, device=device)  # (B, S, k) keys
    _dense_topk_kernel[(n_qblocks, n_splits)](
        queries,
        items,
        ex_ids,
        starts,
        ends,
        out,
        B,
        N,
        queries.shape[1],
        tiles_per_split,
        queries.stride(0),
        queries.stride(1),
        items.stride(0),
        items.stride(1),
        K=k,
        KP=_next_power_of_2(k),
        HAS_EXCL=exclude is not None,
        IEEE=queries.dtype == torch.float32,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=min(64, max(16, _next_power_of_2(queries.shape[1]))),
        num_warps=8,  # sm_90 build: no spills at 8 warps for bf16/fp16 (4 warps spill at d = 64)
    )
    # the kernel's lists are unordered: one topk over the splits' keys merges and sorts them
    keys = torch.topk(out.view(B, n_splits * k), k, dim=1, sorted=True).values  # (B, k) exact: distinct keys
    return _decode(keys)


def dense_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    users: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` items per query by dot product, masking ``exclude``: the kernel on CUDA, else torch.

    Args:
        queries: (B, d) float32/float16/bfloat16 query (user) embeddings.
        items: (N, d) item (document) embeddings, same dtype and device.
        k: (int) list length, >= 1 (may exceed N).
        exclude: (ItemSets | None) per-user items never returned. Default: ``None``.
        users: (B,) int64 row of ``exclude`` for each query; ``None`` means query ``b`` is user ``b``.

    Returns:
        (scores, ids): (B, k) float32 and (B, k) int64 on the queries' device, sorted by
        (score desc, item id asc); missing candidates are ``-inf`` / ``-1``.

    Raises:
        ValueError: on ``k <= 0``, NaN or infinite embeddings, or mismatched shapes, dtypes or
            devices -- before any kernel is launched.
    """
    if queries.is_cuda and isinstance(k, int) and k <= MAX_TRITON_K:
        return dense_topk_triton(queries, items, k, exclude, users)
    return dense_topk_reference(queries, items, k, exclude, users)
