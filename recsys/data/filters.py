"""Interaction filters applied before splitting: explicit-to-implicit threshold and k-core.

Filters keep the ids as they are (they may leave gaps); the DataModule compacts ids
afterwards when users or items were removed.
"""

from __future__ import annotations

import logging

import polars as pl

log = logging.getLogger(__name__)


def implicit(df: pl.DataFrame, threshold: float | None) -> pl.DataFrame:
    """Keep the interactions that count as positive feedback.

    Args:
        df: (pl.DataFrame) interactions with a ``rating`` column.
        threshold: (float | None) keep rows with ``rating >= threshold``; rows without a
            rating are dropped. ``None`` keeps every interaction (already implicit data, or
            "any rating is a positive").

    Returns:
        The kept rows, columns unchanged (ratings are kept for reference).

    Raises:
        ValueError: a threshold is given but no row has a rating.
    """
    if threshold is None:
        return df
    if df.height and df["rating"].null_count() == df.height:
        raise ValueError(
            f"implicit(threshold={threshold}) needs ratings, but every rating is null "
            "(implicit-feedback data): use threshold=None"
        )
    out = df.filter(pl.col("rating") >= threshold)
    log.info("implicit(threshold=%s): kept %d of %d interactions", threshold, out.height, df.height)
    return out


def k_core(df: pl.DataFrame, k: int) -> pl.DataFrame:
    """The iterative user-and-item k-core: every remaining user and item has >= ``k`` interactions.

    Rows of users or items with fewer than ``k`` interactions are removed, repeatedly, until
    nothing changes (removing an item can push a user below ``k`` and vice versa). Each row
    counts once, so repeated (user, item) rows count repeatedly.

    Args:
        df: (pl.DataFrame) interactions with ``user`` and ``item`` columns.
        k: (int) minimum interactions per user and per item; ``k <= 1`` returns ``df``.

    Returns:
        The surviving rows in their original order (possibly empty).
    """
    if k != int(k) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if k <= 1:
        return df
    out, rounds = df, 0
    while True:
        keep = (pl.len().over("user") >= k) & (pl.len().over("item") >= k)
        nxt = out.filter(keep)
        rounds += 1
        if nxt.height == out.height:
            break
        out = nxt
    log.info("k_core(k=%d): kept %d of %d interactions after %d rounds", k, out.height, df.height, rounds)
    return out


__all__ = ["implicit", "k_core"]
