"""Filters: implicit threshold counts on ML-100K and the k-core property."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import implicit, k_core, load_interactions


@pytest.fixture(scope="module")
def ml100k(shared_data: Path) -> pl.DataFrame:
    return load_interactions("movielens-100k").interactions


@pytest.mark.parametrize(("threshold", "kept"), [(None, 100_000), (1, 100_000), (4, 55_375), (5, 21_201)])
def test_implicit_counts_ml100k(ml100k: pl.DataFrame, threshold: float | None, kept: int) -> None:
    out = implicit(ml100k, threshold)
    assert out.height == kept
    if threshold is not None:
        assert (out["rating"] >= threshold).all()


def test_implicit_needs_ratings() -> None:
    df = pl.DataFrame({"user": [0], "item": [0], "rating": [None]}, schema_overrides={"rating": pl.Float32})
    assert implicit(df, None).height == 1
    with pytest.raises(ValueError, match="threshold=None"):
        implicit(df, 4)


def _random_interactions(seed: int, n: int = 3000, users: int = 200, items: int = 150) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    u = rng.zipf(1.6, n) % users
    i = rng.zipf(1.4, n) % items
    return pl.DataFrame({"user": u, "item": i}).unique(maintain_order=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 5, 10])
def test_k_core_property(seed: int, k: int) -> None:
    df = _random_interactions(seed)
    out = k_core(df, k)
    if out.height:
        assert out.group_by("user").len()["len"].min() >= k
        assert out.group_by("item").len()["len"].min() >= k
    # maximal: a row is dropped only if it is outside the k-core, so re-running changes nothing
    assert k_core(out, k).equals(out)
    # subset of the input, order kept
    assert out.join(df, on=["user", "item"], how="anti").height == 0
    assert out.equals(df.join(out, on=["user", "item"], how="semi", maintain_order="left"))


def test_k_core_needs_iteration() -> None:
    # a chain (0,0) (0,1) (1,1) (1,2) (2,2) unravels one step at a time under k=2;
    # users 3, 4 x items 3, 4 form a 2-core that stays.
    chain = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    core = [(3, 3), (3, 4), (4, 3), (4, 4)]
    df = pl.DataFrame(chain + core, schema=["user", "item"], orient="row")
    assert k_core(df, 2).rows() == core
    assert k_core(df, 1).equals(df)
    with pytest.raises(ValueError):
        k_core(df, -1)


def test_k_core_ml100k_is_already_a_20_core_for_users(ml100k: pl.DataFrame) -> None:
    out = k_core(ml100k, 20)
    assert out["user"].n_unique() <= 943 and out.group_by("user").len()["len"].min() >= 20
    assert out.group_by("item").len()["len"].min() >= 20
