"""Readers on the shared datasets, read in place: published counts, id maps, features, cache."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys.data import DATASETS, InteractionData, load_interactions, load_sessions
from recsys.data import movielens as ml
from recsys.data.tables import INTERACTION_SCHEMA


@pytest.fixture(scope="module")
def loaded(shared_data: Path) -> dict[str, InteractionData]:
    """Every registered dataset, loaded once for the module (ML-1M is ~1M rows)."""
    return {name: load_interactions(name) for name in DATASETS}


COUNTS = {
    # name: (interactions, users, items)
    "movielens-100k": (100_000, 943, 1_682),
    "movielens-1m": (1_000_209, 6_040, 3_706),
    "lightgcn-gowalla": (810_128 + 217_242, 29_858, 40_981),
    "coat": (6_960 + 4_640, 290, 300),
    # the card says 12,390 events; the file has 12,391 data lines (its last line has no
    # trailing newline, which `wc -l` does not count). 4,710 + 7,681 anonymous = 12,391.
    "session-diginetica-sample": (12_391, 2_986, 7_139),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_and_contiguous_ids(loaded: dict[str, InteractionData], name: str) -> None:
    data = loaded[name]
    rows, users, items = COUNTS[name]
    df = data.interactions
    assert (df.height, data.num_users, data.num_items) == (rows, users, items)
    assert dict(df.schema) == INTERACTION_SCHEMA
    assert df["user"].min() == 0 and df["user"].max() == users - 1 and df["user"].n_unique() == users
    assert df["item"].min() == 0 and df["item"].max() == items - 1 and df["item"].n_unique() == items
    for mapping, key, n in ((data.user_map, "user", users), (data.item_map, "item", items)):
        assert mapping.columns == ["raw_id", key] and mapping.schema["raw_id"] == pl.Utf8
        assert mapping[key].to_list() == list(range(n))
        assert mapping["raw_id"].n_unique() == n


def test_ml100k_mapping_kept_and_features(loaded: dict[str, InteractionData], shared_data: Path) -> None:
    data = loaded["movielens-100k"]
    # first line of u.data: 196 \t 242 \t 3 \t 881250949
    first = data.interactions.row(0, named=True)
    assert data.user_map.filter(pl.col("user") == first["user"])["raw_id"].item() == "196"
    assert data.item_map.filter(pl.col("item") == first["item"])["raw_id"].item() == "242"
    assert (first["rating"], first["timestamp"], first["split"]) == (3.0, 881250949, None)
    items = data.item_features.join(data.item_map, on="item")
    toy = items.filter(pl.col("raw_id") == "1").row(0, named=True)
    assert toy["title"] == "Toy Story (1995)" and toy["year"] == 1995
    assert toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert items.filter(pl.col("raw_id") == "543")["title"].item() == "Misérables, Les (1995)"  # latin-1
    assert data.item_features.height == 1_682 and data.item_features["title"].null_count() == 0
    assert data.user_features.columns == ["user", "age", "gender", "occupation", "zip"]
    assert data.interactions["timestamp"].null_count() == 0
    assert data.interactions["rating"].is_between(1, 5).all()


def test_ml1m_without_timestamps(loaded: dict[str, InteractionData]) -> None:
    data = loaded["movielens-1m"]
    df = data.interactions
    assert df["timestamp"].null_count() == df.height  # only ratings_notimestamp.dat is shared
    hist = df.group_by("rating").len().sort("rating")["len"].to_list()
    assert hist == [56_174, 107_557, 261_197, 348_971, 226_310]
    items = data.item_features.join(data.item_map, on="item")
    assert items.filter(pl.col("raw_id") == "73")["title"].item() == "Misérables, Les (1995)"
    assert items.filter(pl.col("raw_id") == "1")["genres"].item().to_list() == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    assert data.item_features.height == 3_706 and data.user_features.height == 6_040


def test_ml1m_prefers_ratings_with_timestamps(tmp_path: Path) -> None:
    d = tmp_path / "movielens-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::978300760\n2::10::3::978302109\n")
    (d / "ratings_notimestamp.dat").write_text("1::10::5\n")
    (d / "movies.dat").write_bytes("10::Caf\xe9 (1995)::Comedy|Drama\n".encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    data = ml.read_ml1m(d)
    assert data.interactions["timestamp"].to_list() == [978300760, 978302109]
    assert data.item_features["title"].to_list() == ["Café (1995)"]


def test_gowalla_shipped_split(loaded: dict[str, InteractionData]) -> None:
    data = loaded["lightgcn-gowalla"]
    counts = dict(data.interactions.group_by("split").len().iter_rows())
    assert counts == {"train": 810_128, "test": 217_242}
    assert data.interactions["rating"].null_count() == data.interactions.height
    # raw ids come from user_list.txt / item_list.txt (org_id remap_id): remap 0 -> 343, 8975
    assert data.user_map.row(0) == ("343", 0) and data.item_map.row(0) == ("8975", 0)


def test_coat(loaded: dict[str, InteractionData]) -> None:
    data = loaded["coat"]
    counts = dict(data.interactions.group_by("split").len().iter_rows())
    assert counts == {"train": 6_960, "test": 4_640}
    per_user = data.interactions.group_by("user", "split").len()
    assert set(per_user.filter(pl.col("split") == "train")["len"]) == {24}
    assert set(per_user.filter(pl.col("split") == "test")["len"]) == {16}
    assert data.user_features.shape == (290, 1 + 14) and data.item_features.shape == (300, 1 + 33)
    assert "gender:women" in data.user_features.columns and "color:navy" in data.item_features.columns
    props = data.extra["propensities"]
    assert props.shape == (290 * 300, 3) and props["propensity"].is_between(0, 1, closed="right").all()
    # user.txt's first triplet (0,72,2) is a nonzero of train.ascii
    assert data.interactions.filter((pl.col("user") == 0) & (pl.col("item") == 72))["rating"].to_list() == [
        2.0
    ]


def test_diginetica_sessions(loaded: dict[str, InteractionData]) -> None:
    s = load_sessions("session-diginetica-sample")
    assert (s.events.height, s.num_sessions, s.num_items) == (12_391, 2_986, 7_139)
    assert s.events.columns == ["session", "item", "user", "time", "date"]
    assert s.events.schema["date"] == pl.Date and s.events["user"].is_not_null().sum() == 4_710
    assert s.item_features["category"].null_count() == 0  # every sample item has a category
    assert (
        s.events["date"].min().isoformat() == "2016-01-03"
        and s.events["date"].max().isoformat() == "2016-06-01"
    )
    ordered = s.events.with_columns(pl.col("time").diff().over("session").alias("d"))
    assert (ordered["d"].drop_nulls() >= 0).all()  # sorted by time within each session
    inter = loaded["session-diginetica-sample"]
    assert inter.item_features.equals(s.item_features)


def test_cache_is_reused(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_interactions("movielens-100k")  # built or cached by the module fixture

    def boom(directory: Path) -> InteractionData:
        raise AssertionError("the reader ran although the cache is current")

    monkeypatch.setattr(ml, "read_ml100k", boom)
    second = load_interactions("movielens-100k")
    assert second.interactions.equals(first.interactions)
    assert second.item_features.equals(first.item_features)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="known: coat"):
        load_interactions("movielens-10m")
