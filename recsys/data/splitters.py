"""Train/validation/test splits of an interactions frame, checked for emptiness and leakage.

Every splitter returns a :class:`Split`, whose constructor refuses an empty part and any
(user, item) pair present in two parts (:class:`LeakageError`). Frames keep all their
columns and rows are never modified, only assigned to a part.

Rounding of the per-user ratio splits follows RecBole's ``RO`` (random ordering) ratio split
(``Dataset._calcu_split_ids`` in RecBole 1.x): for a user with ``n`` interactions and
normalised ratios ``(r_train, r_val, r_test)``,

* ``n_val = floor(r_val * n)``, ``n_test = floor(r_test * n)``, ``n_train`` = the rest;
* then, so that no part is needlessly empty: if ``0 < r_test * n < 1`` and ``n_train > 1``,
  one interaction moves from train to test; next, if ``0 < r_val * n < 1`` and
  ``n_train > 1``, one moves from train to validation.

Before the moves ``n_train >= n - r_val * n - r_test * n = r_train * n > 0``, and a move
needs ``n_train > 1``, so every user keeps at least one training interaction. With
(0.8, 0.1, 0.1): n=1 -> 1/0/0, n=2 -> 1/0/1, n=3 -> 1/1/1,
n=10 -> 8/1/1, n=19 -> 17/1/1, n=20 -> 16/2/2. The user's interactions are shuffled with a
seeded :class:`numpy.random.Generator` and cut in order train | val | test.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

_PARTS = ("train", "val", "test")
_KEYS = ["user", "item"]


class LeakageError(ValueError):
    """Two parts of a split share (user, item) pairs."""


@dataclass(frozen=True)
class Split:
    """Train, validation and test interactions, pairwise disjoint on (user, item).

    Attributes:
        train: (pl.DataFrame) training interactions (``user``, ``item``, ...).
        val: (pl.DataFrame) validation interactions, for model selection.
        test: (pl.DataFrame) test interactions, evaluated once.
        no_validation: (bool) the protocol has no validation data on purpose (e.g. reproducing
            a paper that had none, reported at a fixed epoch budget); ``val`` must then be
            empty. Default False: every part must be non-empty.

    Raises:
        ValueError: a part is empty (``val`` only when ``no_validation``), ``val`` is not empty
            though ``no_validation`` is set, or a part lacks ``user``/``item`` columns.
        LeakageError: two parts share (user, item) pairs; the message gives the count and
            the smallest shared pair.
    """

    train: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame
    no_validation: bool = False

    def __post_init__(self) -> None:
        if self.no_validation and self.val.height:
            raise ValueError(f"Split.no_validation is set but val has {self.val.height} rows")
        for part in _PARTS:
            df = getattr(self, part)
            missing = [c for c in _KEYS if c not in df.columns]
            if missing:
                raise ValueError(f"Split.{part} lacks columns {missing}; has {df.columns}")
            if df.height == 0 and not (part == "val" and self.no_validation):
                raise ValueError(
                    f"Split.{part} is empty (train/val/test = {self.train.height}/{self.val.height}/"
                    f"{self.test.height}); use larger ratios or a dataset with more interactions per user"
                )
        for i, a in enumerate(_PARTS):
            for b in _PARTS[i + 1 :]:
                shared = (
                    getattr(self, a)
                    .select(_KEYS)
                    .unique()
                    .join(getattr(self, b).select(_KEYS).unique(), on=_KEYS, how="inner")
                    .sort(_KEYS)
                )
                if shared.height:
                    u, it = shared.row(0)
                    raise LeakageError(
                        f"{a} and {b} share {shared.height} (user, item) pairs, e.g. (user {u}, item {it})"
                    )

    def __repr__(self) -> str:
        return f"Split(train={self.train.height}, val={self.val.height}, test={self.test.height})"


def _ratios(ratios: Sequence[float], n: int = 3) -> list[float]:
    r = [float(x) for x in ratios]
    if len(r) != n or any(not np.isfinite(x) or x < 0 for x in r) or r[0] <= 0:
        raise ValueError(
            f"ratios must be {n} finite non-negative numbers with train > 0, got {tuple(ratios)}"
        )
    total = sum(r)
    return [x / total for x in r]


def _user_parts(df: pl.DataFrame, ratios: Sequence[float], seed: int) -> pl.DataFrame:
    """``df`` with a ``_part`` column (0 train, 1 val, 2 test) by the per-user RO rule.

    Rows are first put in a canonical order (user, item, then input order), so the result
    does not depend on the input row order unless a (user, item) pair repeats.
    """
    _, r_val, r_test = ratios
    base = df.with_row_index("_row").sort("user", "item", "_row")
    key = np.random.default_rng(seed).permutation(base.height)
    n = pl.len().over("user")
    counts = (
        base.with_columns(pl.Series("_key", key, dtype=pl.Int64))
        .sort("user", "_key")
        .with_columns(
            (pl.int_range(pl.len()).over("user")).alias("_pos"),
            n.alias("_n"),
            (pl.lit(r_val) * n).alias("_fv"),
            (pl.lit(r_test) * n).alias("_ft"),
        )
        .with_columns(
            pl.col("_fv").floor().cast(pl.Int64).alias("_nv"),
            pl.col("_ft").floor().cast(pl.Int64).alias("_nt"),
        )
        .with_columns((pl.col("_n") - pl.col("_nv") - pl.col("_nt")).alias("_ntr"))
    )
    bump_test = (pl.col("_ntr") > 1) & (pl.col("_ft") > 0) & (pl.col("_ft") < 1)
    counts = counts.with_columns(
        pl.when(bump_test).then(pl.col("_nt") + 1).otherwise(pl.col("_nt")).alias("_nt"),
        pl.when(bump_test).then(pl.col("_ntr") - 1).otherwise(pl.col("_ntr")).alias("_ntr"),
    )
    bump_val = (pl.col("_ntr") > 1) & (pl.col("_fv") > 0) & (pl.col("_fv") < 1)
    counts = counts.with_columns(
        pl.when(bump_val).then(pl.col("_nv") + 1).otherwise(pl.col("_nv")).alias("_nv"),
        pl.when(bump_val).then(pl.col("_ntr") - 1).otherwise(pl.col("_ntr")).alias("_ntr"),
    )
    part = (
        pl.when(pl.col("_pos") < pl.col("_ntr"))
        .then(0)
        .when(pl.col("_pos") < pl.col("_ntr") + pl.col("_nv"))
        .then(1)
        .otherwise(2)
    )
    return (
        counts.with_columns(part.alias("_part"))
        .sort("_row")
        .drop("_row", "_key", "_pos", "_n", "_fv", "_ft", "_nv", "_nt", "_ntr")
    )


def _by_part(df: pl.DataFrame) -> Split:
    """Split a frame with ``_part`` (0/1/2) into a :class:`Split` (helper columns dropped)."""
    helpers = [c for c in ("_part", "_row") if c in df.columns]
    frames = [df.filter(pl.col("_part") == i).drop(helpers) for i in range(3)]
    split = Split(*frames)
    log.info("split: %r", split)
    return split


def random_split(df: pl.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 2020) -> Split:
    """Per-user random split by ratios (RecBole ``RO`` rounding; see the module docstring).

    Args:
        df: (pl.DataFrame) interactions with ``user`` and ``item``.
        ratios: (Sequence[float]) train, validation, test shares, normalised to sum 1;
            train must be > 0. Default (0.8, 0.1, 0.1).
        seed: (int) seed of the shuffle; equal seeds give identical splits. Default 2020.

    Returns:
        :class:`Split`; each part keeps the input row order.
    """
    return _by_part(_user_parts(df, _ratios(ratios), seed))


def _need_timestamps(df: pl.DataFrame, who: str) -> None:
    if "timestamp" not in df.columns or df["timestamp"].null_count() > 0:
        n = df["timestamp"].null_count() if "timestamp" in df.columns else df.height
        raise ValueError(
            f"{who} needs a timestamp on every interaction, but {n} of {df.height} have none "
            "(e.g. ML-1M read from ratings_notimestamp.dat); use random_split instead"
        )


def leave_one_out(df: pl.DataFrame) -> Split:
    """Per user, the latest interaction is test and the second latest validation.

    Interactions are ordered by ``timestamp``; equal timestamps are ordered by item id (the
    larger id counts as later). Every user keeps one training interaction: a user with one
    interaction has only train, with two train and test (no validation).

    Raises:
        ValueError: some interaction has no timestamp.
    """
    _need_timestamps(df, "leave_one_out")
    order = df.with_row_index("_row").sort("user", "timestamp", "item", "_row")
    back = pl.int_range(pl.len(), 0, -1).over("user")  # n..1: 1 is the latest
    n = pl.len().over("user")
    part = (
        pl.when(back == 1)
        .then(pl.when(n >= 2).then(2).otherwise(0))
        .when((back == 2) & (n >= 3))
        .then(1)
        .otherwise(0)
    )
    return _by_part(order.with_columns(part.alias("_part")).sort("_row"))


def temporal_split(df: pl.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> Split:
    """Global temporal split: two time cut points shared by all users.

    With ``N`` interactions sorted by time, ``n_val = floor(r_val * N)``,
    ``n_test = floor(r_test * N)``, ``n_train = N - n_val - n_test``; the cut points are the
    timestamps ``t1`` at sorted position ``n_train`` and ``t2`` at ``n_train + n_val``.
    Train is ``timestamp < t1``, validation ``t1 <= timestamp < t2``, test ``timestamp >= t2``,
    so interactions with equal timestamps always share a part (sizes can differ slightly from
    the ratios when timestamps tie at a cut). Users or items first seen after a cut are kept.

    Raises:
        ValueError: some interaction has no timestamp.
    """
    _need_timestamps(df, "temporal_split")
    _, r_val, r_test = _ratios(ratios)
    ts = df["timestamp"].sort()
    n = ts.len()
    n_val, n_test = int(np.floor(r_val * n)), int(np.floor(r_test * n))
    n_train = n - n_val - n_test
    if n_train >= n or n_train + n_val >= n:
        raise ValueError(f"temporal_split{tuple(ratios)} of {n} interactions leaves the test part empty")
    t1, t2 = ts[n_train], ts[n_train + n_val]
    part = pl.when(pl.col("timestamp") < t1).then(0).when(pl.col("timestamp") < t2).then(1).otherwise(2)
    log.info("temporal_split: cut points %d and %d", t1, t2)
    return _by_part(df.with_columns(part.alias("_part")))


def predefined_split(
    df: pl.DataFrame, val_ratio: float = 0.1, seed: int = 2020, *, overlap: str = "error"
) -> Split:
    """The dataset's shipped train/test split; validation is carved per user from train.

    Validation takes ``floor(val_ratio * n)`` of each user's ``n`` training interactions
    (one if that is 0 and the user has at least two), chosen at random with ``seed``; the
    RO rule of the module docstring with ratios ``(1 - val_ratio, val_ratio, 0)``. Test rows
    are kept exactly as shipped. ``val_ratio=0`` keeps the whole shipped train for training
    and returns a split with ``no_validation`` set (for reproducing papers that had no
    validation data; such results must be reported at a fixed epoch budget).

    Args:
        df: (pl.DataFrame) interactions whose ``split`` column is ``"train"`` or ``"test"``.
        val_ratio: (float) share of each user's training interactions used for
            validation, in [0, 1). Default 0.1.
        seed: (int) seed of the validation draw. Default 2020.
        overlap: (str) what to do with (user, item) pairs that are both in the shipped train
            and test (Coat has 366: a coat a user chose and was also shown at random):
            ``"error"`` raises :class:`LeakageError` (default); ``"drop_train"`` removes
            them from train, keeping the published test set intact, and logs how many.

    Raises:
        ValueError: no ``split`` column, a value other than train/test, or a bad argument.
        LeakageError: shipped train and test overlap and ``overlap="error"``.
    """
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if overlap not in ("error", "drop_train"):
        raise ValueError(f"overlap must be 'error' or 'drop_train', got {overlap!r}")
    if "split" not in df.columns or df["split"].null_count() == df.height:
        raise ValueError(
            "predefined_split needs the dataset's shipped split ('split' column); this data has none"
        )
    bad = df.filter(~pl.col("split").is_in(["train", "test"]) | pl.col("split").is_null())
    if bad.height:
        raise ValueError(
            f"'split' must be 'train' or 'test' on every row; "
            f"{bad.height} rows are not (e.g. {bad['split'][0]!r})"
        )
    train = df.filter(pl.col("split") == "train")
    test = df.filter(pl.col("split") == "test")
    shared = train.select(_KEYS).unique().join(test.select(_KEYS).unique(), on=_KEYS).sort(_KEYS)
    if shared.height:
        u, it = shared.row(0)
        if overlap == "error":
            raise LeakageError(
                f"the shipped train and test share {shared.height} (user, item) pairs, "
                f"e.g. (user {u}, item {it}); "
                "pass overlap='drop_train' to drop them from train and keep the published test set"
            )
        train = train.join(shared, on=_KEYS, how="anti", maintain_order="left")
        log.warning("predefined_split: dropped %d train rows whose pair is also in test", shared.height)
    if val_ratio == 0:
        log.warning("predefined_split: no validation data; report results at a fixed epoch budget")
        return Split(train, train.clear(), test, no_validation=True)
    parts = _user_parts(train, [1.0 - val_ratio, val_ratio, 0.0], seed)
    return Split(
        parts.filter(pl.col("_part") == 0).drop("_part"),
        parts.filter(pl.col("_part") == 1).drop("_part"),
        test,
    )


__all__ = ["LeakageError", "Split", "leave_one_out", "predefined_split", "random_split", "temporal_split"]
