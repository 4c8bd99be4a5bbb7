"""Splitters: disjoint parts whose union is the input, documented per-user ratios, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import (
    LeakageError,
    Split,
    leave_one_out,
    load_interactions,
    predefined_split,
    random_split,
    temporal_split,
)

KEYS = ["user", "item"]


def _toy(seed: int = 0, users: int = 40, max_items: int = 30, with_time: bool = True) -> pl.DataFrame:
    """Users with 1..max_items distinct items each, random timestamps (ties included)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = 1 + u % max_items
        for i in rng.choice(200, size=n, replace=False):
            rows.append(
                (u, int(i), float(rng.integers(1, 6)), int(rng.integers(0, 50)) if with_time else None)
            )
    return pl.DataFrame(
        rows,
        schema={"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64},
        orient="row",
    )


def _assert_partition(split: Split, df: pl.DataFrame) -> None:
    parts = [split.train, split.val, split.test]
    for p in parts:
        assert p.columns == df.columns
    union = pl.concat(parts).sort(KEYS)
    assert union.equals(df.sort(KEYS))
    for a in range(3):
        for b in range(a + 1, 3):
            assert parts[a].join(parts[b], on=KEYS).height == 0


def _expected_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """The documented RO rule, written out independently of the implementation."""
    total = sum(ratios)
    r_tr, r_v, r_te = (r / total for r in ratios)
    n_v, n_te = int(np.floor(r_v * n)), int(np.floor(r_te * n))
    n_tr = n - n_v - n_te
    if n_tr > 1 and 0 < r_te * n < 1:
        n_te, n_tr = n_te + 1, n_tr - 1
    if n_tr > 1 and 0 < r_v * n < 1:
        n_v, n_tr = n_v + 1, n_tr - 1
    return n_tr, n_v, n_te


def _per_user(split: Split) -> dict[int, tuple[int, int, int]]:
    counts: dict[int, list[int]] = {}
    for k, part in enumerate([split.train, split.val, split.test]):
        for u, c in part.group_by("user").len().iter_rows():
            counts.setdefault(u, [0, 0, 0])[k] = c
    return {u: tuple(c) for u, c in counts.items()}


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.1, 0.2), (8, 1, 1), (0.6, 0.2, 0.2)])
@pytest.mark.parametrize("seed", [0, 2020])
def test_random_split_ratios_per_user(ratios: tuple[float, float, float], seed: int) -> None:
    df = _toy(seed)
    split = random_split(df, ratios, seed=seed)
    _assert_partition(split, df)
    sizes = dict(df.group_by("user").len().iter_rows())
    got = _per_user(split)
    for u, n in sizes.items():
        assert got[u] == _expected_counts(n, ratios), (u, n)
        assert got[u][0] >= 1  # every user keeps a training interaction


def test_random_split_documented_examples() -> None:
    assert [_expected_counts(n, (0.8, 0.1, 0.1)) for n in (1, 2, 3, 10, 19, 20)] == [
        (1, 0, 0),
        (1, 0, 1),
        (1, 1, 1),
        (8, 1, 1),
        (17, 1, 1),
        (16, 2, 2),
    ]


def test_random_split_reproducible_and_seed_dependent() -> None:
    df = _toy(3)
    a, b = random_split(df, seed=7), random_split(df, seed=7)
    for x, y in zip([a.train, a.val, a.test], [b.train, b.val, b.test], strict=True):
        assert x.equals(y)
    c = random_split(df, seed=8)
    assert not c.test.equals(a.test)
    # independent of the input row order
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=1)
    d = random_split(shuffled, seed=7)
    assert d.test.sort(KEYS).equals(a.test.sort(KEYS))


def test_random_split_ml100k(shared_data: Path) -> None:
    df = load_interactions("movielens-100k").interactions
    split = random_split(df)
    _assert_partition(split, df)
    sizes = df.group_by("user").len()["len"]
    expected = tuple(sum(_expected_counts(n, (0.8, 0.1, 0.1))[k] for n in sizes) for k in range(3))
    assert (split.train.height, split.val.height, split.test.height) == expected == (80_808, 9_596, 9_596)


def test_random_split_bad_ratios() -> None:
    with pytest.raises(ValueError, match="ratios"):
        random_split(_toy(), (0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="ratios"):
        random_split(_toy(), (0.8, 0.2))


def test_leave_one_out_picks_latest() -> None:
    df = pl.DataFrame(
        {
            "user": [0, 0, 0, 0, 1, 1, 2, 3, 3, 3],
            "item": [5, 1, 2, 9, 4, 3, 7, 8, 6, 2],
            "timestamp": [10, 40, 30, 20, 5, 6, 1, 9, 9, 9],
        }
    )
    split = leave_one_out(df)
    _assert_partition(split, df)
    # user 3's three interactions tie on time: the larger item id counts as later
    assert split.test.sort("user").select(KEYS).rows() == [(0, 1), (1, 3), (3, 8)]
    assert split.val.sort("user").select(KEYS).rows() == [(0, 2), (3, 6)]  # user 1 has 2 rows: no val
    assert split.train.filter(pl.col("user") == 2).height == 1  # a single interaction stays in train


def test_leave_one_out_on_toy_is_latest_per_user() -> None:
    df = _toy(5).unique(["user", "timestamp"], keep="first", maintain_order=True)
    split = leave_one_out(df)
    _assert_partition(split, df)
    latest = split.train.group_by("user").agg(pl.col("timestamp").max().alias("t"))
    for part in (split.val, split.test):
        joined = part.join(latest, on="user")
        assert (joined["timestamp"] > joined["t"]).all()


def test_timestamp_splitters_need_timestamps(shared_data: Path) -> None:
    df = load_interactions("movielens-1m").interactions.head(1000)  # ratings_notimestamp.dat
    with pytest.raises(ValueError, match="timestamp"):
        leave_one_out(df)
    with pytest.raises(ValueError, match="timestamp"):
        temporal_split(df)


def test_temporal_split_cut_points() -> None:
    df = pl.DataFrame(
        {"user": list(range(10)) * 2, "item": [0] * 10 + [1] * 10, "timestamp": list(range(20))}
    )
    split = temporal_split(df, (0.8, 0.1, 0.1))
    _assert_partition(split, df)
    assert split.train["timestamp"].max() < split.val["timestamp"].min()
    assert split.val["timestamp"].max() < split.test["timestamp"].min()
    assert (split.train.height, split.val.height, split.test.height) == (16, 2, 2)


def test_temporal_split_keeps_ties_together() -> None:
    df = _toy(1)
    split = temporal_split(df)
    _assert_partition(split, df)
    assert split.train["timestamp"].max() < split.val["timestamp"].min()
    assert split.val["timestamp"].max() < split.test["timestamp"].min()


def test_predefined_split_uses_shipped_split(shared_data: Path) -> None:
    df = load_interactions("lightgcn-gowalla").interactions
    split = predefined_split(df, val_ratio=0.1, seed=2020)
    _assert_partition(split, df)
    assert split.test.height == 217_242 and (split.test["split"] == "test").all()
    assert split.train.height + split.val.height == 810_128
    assert (split.val["split"] == "train").all()
    sizes = dict(df.filter(pl.col("split") == "train").group_by("user").len().iter_rows())
    got = _per_user(Split(split.train, split.val, split.test))
    for u in list(sizes)[:2000]:
        assert got[u][:2] == _expected_counts(sizes[u], (0.9, 0.1, 0.0))[:2]
    again = predefined_split(df, val_ratio=0.1, seed=2020)
    assert again.val.equals(split.val)


def test_predefined_split_coat_overlap(shared_data: Path) -> None:
    df = load_interactions("coat").interactions
    with pytest.raises(LeakageError, match="366 .*overlap='drop_train'"):
        predefined_split(df)
    split = predefined_split(df, overlap="drop_train")
    assert split.test.height == 4_640
    assert split.train.height + split.val.height == 6_960 - 366


def test_predefined_split_needs_split_column() -> None:
    with pytest.raises(ValueError, match="shipped split"):
        predefined_split(_toy().with_columns(pl.lit(None, dtype=pl.Utf8).alias("split")))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        predefined_split(_toy().with_columns(pl.lit("valid").alias("split")))


def test_predefined_split_without_validation_keeps_all_shipped_train() -> None:
    df = pl.DataFrame({"user": [0, 0, 1, 1, 0], "item": [0, 1, 2, 3, 4], "split": ["train"] * 4 + ["test"]})
    split = predefined_split(df, val_ratio=0.0)
    assert split.no_validation and split.val.height == 0
    assert split.train.height == 4 and split.test.height == 1


def test_split_refuses_validation_rows_when_marked_without_validation() -> None:
    df = pl.DataFrame({"user": [0, 1, 2], "item": [0, 1, 2]})
    with pytest.raises(ValueError, match="no_validation is set but val has 1 rows"):
        Split(df.slice(0, 1), df.slice(1, 1), df.slice(2, 1), no_validation=True)
