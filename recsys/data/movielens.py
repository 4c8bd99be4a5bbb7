"""MovieLens 100K and 1M readers (GroupLens Research, Harper & Konstan, ACM TiiS 5(4), 2015).

* ML-100K: ``u.data`` (``user \\t item \\t rating \\t unix seconds``), ``u.item`` (pipe
  separated, latin-1: id, title, release date, video date, IMDb URL, 19 genre flags),
  ``u.genre`` (the flags' names), ``u.user`` (id, age, gender, occupation, zip).
* ML-1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, unix seconds) or, when only
  that is available, ``ratings_notimestamp.dat`` (``UserID::MovieID::Rating``; timestamps are
  then null); ``movies.dat`` (``MovieID::Title::Genres``, genres ``|``-separated, latin-1);
  ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``, age and occupation are codes).

Ids are remapped to ``0..n-1`` in increasing raw-id order over the users and movies that
have ratings (ML-1M lists 3,883 movies, 3,706 of them rated). Ratings are 1..5 stars.
Item features: ``title``, ``genres`` (list of names), ``year`` (ML-100K: from the release
date, else the title's ``(YYYY)``; ML-1M: from the title).
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from recsys.data.tables import (
    InteractionData,
    check_unique,
    id_map,
    interaction_frame,
    parse_float,
    parse_int,
    read_lines,
    split_fields,
)
from retrieval.data.errors import DataFormatError
from retrieval.data.source import DatasetSource, RemoteFile, cached_tables

log = logging.getLogger(__name__)

READER_VERSION = "movielens-1"

ML100K = DatasetSource(
    name="movielens-100k",
    required=("u.data", "u.item", "u.genre", "u.user"),
    remote=(
        RemoteFile(
            url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
            sha256=None,
            md5="0e33842e24a9c977be4e0107933c0723",
            extract=True,
            strip="ml-100k/",
        ),
    ),
    card="datasets/movielens-100k/README.md",
)

ML1M = DatasetSource(
    name="movielens-1m",
    required=("ratings.dat|ratings_notimestamp.dat", "movies.dat", "users.dat"),
    remote=(
        RemoteFile(
            url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            sha256=None,
            md5="c4d9eecfca2ab87c1945afe126590906",
            extract=True,
            strip="ml-1m/",
        ),
    ),
    card="datasets/movielens-1m/README.md",
)

_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"


def _ratings(path: Path, sep: str, with_time: bool) -> pl.DataFrame:
    """``_line``, ``raw_user``, ``raw_item``, ``rating`` Float64 in [1, 5], ``timestamp``."""
    names = ["raw_user", "raw_item", "rating"] + (["timestamp"] if with_time else [])
    df = split_fields(read_lines(path), path, sep, names)
    df = parse_int(df, "raw_user", path, "user id")
    df = parse_int(df, "raw_item", path, "movie id")
    df = parse_float(df, "rating", path, "rating", lo=1.0, hi=5.0)
    if with_time:
        df = parse_int(df, "timestamp", path, "unix timestamp", lo=0)
    if df.height == 0:
        raise DataFormatError(path, None, "at least one rating", "no data lines")
    check_unique(df, ["raw_user", "raw_item"], path, "rating")
    return df


def _restrict(features: pl.DataFrame, mapping: pl.DataFrame, key: str) -> pl.DataFrame:
    """One feature row per mapped id (``raw`` → ``key``), null where the file has none."""
    missing = mapping.join(features, on="raw", how="anti")
    if missing.height:
        log.warning("%d %ss have no feature row (e.g. raw id %s)", missing.height, key, missing["raw"][0])
    return (
        mapping.select("raw", key)
        .join(features, on="raw", how="left", maintain_order="left")
        .drop("raw")
        .sort(key)
    )


def _build(
    name: str,
    ratings: pl.DataFrame,
    items: pl.DataFrame,
    users: pl.DataFrame,
) -> InteractionData:
    user_map = id_map(ratings["raw_user"], "user")
    item_map = id_map(ratings["raw_item"], "item")
    return InteractionData(
        name=name,
        interactions=interaction_frame(ratings, user_map, item_map),
        num_users=user_map.height,
        num_items=item_map.height,
        user_map=user_map.drop("raw"),
        item_map=item_map.drop("raw"),
        user_features=_restrict(users, user_map, "user"),
        item_features=_restrict(items, item_map, "item"),
    )


# --------------------------------------------------------------------------- ML-100K


def _items_100k(path: Path, genre_path: Path) -> pl.DataFrame:
    genres = split_fields(read_lines(genre_path, "latin-1"), genre_path, "|", ["genre", "index"])
    genres = parse_int(genres, "index", genre_path, "genre index", lo=0).sort("index")
    if genres["index"].to_list() != list(range(genres.height)):
        raise DataFormatError(
            genre_path, None, "genre indices 0..n-1, each once", str(genres["index"].to_list())
        )
    names = genres["genre"].to_list()
    flags = [f"g{i}" for i in range(len(names))]
    cols = ["raw", "title", "release_date", "video_release_date", "url", *flags]
    df = split_fields(read_lines(path, "latin-1"), path, "|", cols)
    df = parse_int(df, "raw", path, "movie id")
    for f in flags:
        df = parse_int(df, f, path, "genre flag (0 or 1)", lo=0, hi=1)
    check_unique(df, ["raw"], path, "line")
    year = (
        pl.when(pl.col("release_date").str.contains(r"\d{4}$"))
        .then(pl.col("release_date").str.slice(-4))
        .otherwise(pl.col("title").str.extract(_YEAR_IN_TITLE))
        .cast(pl.Int32, strict=False)
    )
    genre_list = pl.concat_list(
        [pl.when(pl.col(f) == 1).then(pl.lit(n)).otherwise(None) for f, n in zip(flags, names, strict=True)]
    ).list.drop_nulls()
    return df.select("raw", "title", genre_list.alias("genres"), year.alias("year"))


def _users_100k(path: Path) -> pl.DataFrame:
    df = split_fields(read_lines(path, "latin-1"), path, "|", ["raw", "age", "gender", "occupation", "zip"])
    df = parse_int(df, "raw", path, "user id")
    df = parse_int(df, "age", path, "age", lo=0)
    check_unique(df, ["raw"], path, "line")
    return df.select("raw", pl.col("age").cast(pl.Int32), "gender", "occupation", "zip")


def read_ml100k(directory: Path) -> InteractionData:
    """Parse ML-100K from its folder (no cache); see the module docstring."""
    d = Path(directory)
    ratings = _ratings(d / "u.data", "\t", with_time=True)
    return _build(
        "movielens-100k", ratings, _items_100k(d / "u.item", d / "u.genre"), _users_100k(d / "u.user")
    )


def load_ml100k(directory: Path) -> InteractionData:
    """ML-100K from ``directory``, through the prepared-table cache."""
    d = Path(directory)
    files = [d / "u.data", d / "u.item", d / "u.genre", d / "u.user"]
    tables = cached_tables(ML100K.name, files, READER_VERSION, lambda: read_ml100k(d).to_tables())
    return InteractionData.from_tables(ML100K.name, tables)


# --------------------------------------------------------------------------- ML-1M


def _ratings_file_1m(d: Path) -> tuple[Path, bool]:
    """``ratings.dat`` (with timestamps) when present, else ``ratings_notimestamp.dat``."""
    if (d / "ratings.dat").exists():
        return d / "ratings.dat", True
    return d / "ratings_notimestamp.dat", False


def _items_1m(path: Path) -> pl.DataFrame:
    df = split_fields(read_lines(path, "latin-1"), path, "::", ["raw", "title", "genres"])
    df = parse_int(df, "raw", path, "movie id")
    check_unique(df, ["raw"], path, "line")
    return df.select(
        "raw",
        "title",
        pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != "")).alias("genres"),
        pl.col("title").str.extract(_YEAR_IN_TITLE).cast(pl.Int32, strict=False).alias("year"),
    )


def _users_1m(path: Path) -> pl.DataFrame:
    df = split_fields(read_lines(path, "latin-1"), path, "::", ["raw", "gender", "age", "occupation", "zip"])
    df = parse_int(df, "raw", path, "user id")
    df = parse_int(df, "age", path, "age code", lo=0)
    df = parse_int(df, "occupation", path, "occupation code", lo=0)
    check_unique(df, ["raw"], path, "line")
    return df.select(
        "raw", "gender", pl.col("age").cast(pl.Int32), pl.col("occupation").cast(pl.Int32), "zip"
    )


def read_ml1m(directory: Path) -> InteractionData:
    """Parse ML-1M from its folder (no cache); see the module docstring."""
    d = Path(directory)
    path, with_time = _ratings_file_1m(d)
    if not with_time:
        log.warning("%s has no ratings.dat; reading %s, timestamps will be null", d, path.name)
    ratings = _ratings(path, "::", with_time)
    return _build("movielens-1m", ratings, _items_1m(d / "movies.dat"), _users_1m(d / "users.dat"))


def load_ml1m(directory: Path) -> InteractionData:
    """ML-1M from ``directory``, through the prepared-table cache."""
    d = Path(directory)
    files = [_ratings_file_1m(d)[0], d / "movies.dat", d / "users.dat"]
    tables = cached_tables(ML1M.name, files, READER_VERSION, lambda: read_ml1m(d).to_tables())
    return InteractionData.from_tables(ML1M.name, tables)


__all__ = ["ML100K", "ML1M", "load_ml100k", "load_ml1m", "read_ml100k", "read_ml1m"]
