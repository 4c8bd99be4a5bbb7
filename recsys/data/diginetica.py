"""DIGINETICA product-view sessions (CIKM Cup 2016, Track 2), as sampled by SR-GNN (Wu et al., AAAI 2019).

Files: ``sample_train-item-views.csv`` (the SR-GNN sample; the full release's
``train-item-views.csv`` has the same format and is read when the sample is absent):
``session_id;user_id;item_id;timeframe;eventdate`` with a header, ``user_id`` ``NA`` when
anonymous, ``timeframe`` in ms since the session started, ``eventdate`` ``YYYY-MM-DD``;
and ``product-categories.csv`` (``itemId;categoryId``, the full catalogue).

Two views of the same cached tables:

* :func:`load_sessions` -> :class:`SessionData`, the events in session order;
* :func:`load_diginetica` -> :class:`~recsys.data.tables.InteractionData` with sessions as
  users (``user`` = session), every event kept (a session may view an item more than once),
  ``rating`` null and ``timestamp`` = ms since the Unix epoch of the session's first
  ``eventdate`` plus ``timeframe`` (so order within a session follows ``timeframe``; across
  sessions it is exact to the day only).

Sessions and items get contiguous ids in increasing raw-id order; the anonymised
``user_id`` is kept raw (nullable).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.data.tables import (
    LINE,
    InteractionData,
    check_header,
    check_unique,
    id_map,
    parse_int,
    read_lines,
    split_fields,
)
from retrieval.data.errors import DataFormatError
from retrieval.data.source import DatasetSource, cached_tables, resolve_dataset_dir

READER_VERSION = "diginetica-1"

DIGINETICA_SAMPLE = DatasetSource(
    name="session-diginetica-sample",
    required=("sample_train-item-views.csv|train-item-views.csv", "product-categories.csv"),
    remote=(),  # the CIKM Cup 2016 files need a registration; see the card
    card="datasets/session-diginetica-sample/README.md",
)
SOURCES = {DIGINETICA_SAMPLE.name: DIGINETICA_SAMPLE}

_VIEWS_HEADER = "session_id;user_id;item_id;timeframe;eventdate"
_CATEGORIES_HEADER = "itemId;categoryId"


@dataclass(frozen=True)
class SessionData:
    """Session events with contiguous session and item ids.

    Attributes:
        name: (str) registered dataset name.
        events: (pl.DataFrame) one row per event, sorted by ``session`` then ``time``:
            ``session`` Int64 in ``[0, num_sessions)``, ``item`` Int64 in ``[0, num_items)``,
            ``user`` Int64 (raw anonymised user id, null when anonymous), ``time`` Int64 (ms
            since the session started, the file's ``timeframe``), ``date`` Date.
        num_sessions: (int) number of sessions.
        num_items: (int) number of distinct items.
        session_map: (pl.DataFrame) ``raw_id`` Utf8, ``session`` Int64.
        item_map: (pl.DataFrame) ``raw_id`` Utf8, ``item`` Int64.
        item_features: (pl.DataFrame) ``item``, ``category`` Int64 (null if not in the catalogue).
    """

    name: str
    events: pl.DataFrame
    num_sessions: int
    num_items: int
    session_map: pl.DataFrame
    item_map: pl.DataFrame
    item_features: pl.DataFrame

    def __repr__(self) -> str:
        return (
            f"SessionData(name={self.name!r}, events={self.events.height}, "
            f"sessions={self.num_sessions}, items={self.num_items})"
        )

    def to_tables(self) -> dict[str, pl.DataFrame]:
        return {
            "events": self.events,
            "session_map": self.session_map,
            "item_map": self.item_map,
            "item_features": self.item_features,
        }

    @classmethod
    def from_tables(cls, name: str, tables: Mapping[str, pl.DataFrame]) -> SessionData:
        return cls(
            name=name,
            events=tables["events"],
            num_sessions=tables["session_map"].height,
            num_items=tables["item_map"].height,
            session_map=tables["session_map"],
            item_map=tables["item_map"],
            item_features=tables["item_features"],
        )

    def to_interactions(self) -> InteractionData:
        """Sessions as users; see the module docstring for ``timestamp``."""
        start = pl.col("date").min().over("session").cast(pl.Datetime("ms")).cast(pl.Int64)
        interactions = self.events.select(
            pl.col("session").alias("user"),
            "item",
            pl.lit(None, dtype=pl.Float32).alias("rating"),
            (start + pl.col("time")).alias("timestamp"),
            pl.lit(None, dtype=pl.Utf8).alias("split"),
        )
        return InteractionData(
            name=self.name,
            interactions=interactions,
            num_users=self.num_sessions,
            num_items=self.num_items,
            user_map=self.session_map.rename({"session": "user"}),
            item_map=self.item_map,
            item_features=self.item_features,
        )


def _views_file(d: Path) -> Path:
    sample = d / "sample_train-item-views.csv"
    return sample if sample.exists() else d / "train-item-views.csv"


def _views(path: Path) -> pl.DataFrame:
    lines = check_header(read_lines(path), path, _VIEWS_HEADER)
    df = split_fields(lines, path, ";", ["raw_session", "user", "raw_item", "time", "date"])
    df = parse_int(df, "raw_session", path, "session id")
    df = parse_int(df, "raw_item", path, "item id")
    df = parse_int(df, "time", path, "timeframe (ms)", lo=0)
    anonymous = pl.col("user").str.strip_chars().is_in(["NA", ""])
    df = df.with_columns(pl.when(anonymous).then(None).otherwise(pl.col("user")).alias("user"))
    df = parse_int(df, "user", path, "user id or NA", nullable=True)
    parsed = pl.col("date").str.strip_chars().str.strptime(pl.Date, "%Y-%m-%d", strict=False)
    bad = df.filter(parsed.is_null()).sort(LINE).head(1)
    if bad.height:
        raise DataFormatError(path, int(bad[LINE][0]), "an eventdate YYYY-MM-DD", bad["date"][0])
    if df.height == 0:
        raise DataFormatError(path, None, "at least one event", "only the header")
    return df.with_columns(parsed.alias("date"))


def _categories(path: Path) -> pl.DataFrame:
    lines = check_header(read_lines(path), path, _CATEGORIES_HEADER)
    df = split_fields(lines, path, ";", ["raw", "category"])
    df = parse_int(parse_int(df, "raw", path, "item id"), "category", path, "category id")
    check_unique(df, ["raw"], path, "category")
    return df.select("raw", "category")


def read_sessions(directory: Path, name: str = DIGINETICA_SAMPLE.name) -> SessionData:
    """Parse the views and categories from ``directory`` (no cache)."""
    d = Path(directory)
    views = _views(_views_file(d))
    session_map = id_map(views["raw_session"], "session")
    item_map = id_map(views["raw_item"], "item")
    events = (
        views.join(
            session_map.select(pl.col("raw").alias("raw_session"), "session"),
            on="raw_session",
            how="left",
            maintain_order="left",
        )
        .join(
            item_map.select(pl.col("raw").alias("raw_item"), "item"),
            on="raw_item",
            how="left",
            maintain_order="left",
        )
        .sort("session", "time", LINE)
        .select("session", "item", "user", "time", "date")
    )
    features = item_map.join(
        _categories(d / "product-categories.csv"), on="raw", how="left", maintain_order="left"
    )
    return SessionData(
        name=name,
        events=events,
        num_sessions=session_map.height,
        num_items=item_map.height,
        session_map=session_map.drop("raw"),
        item_map=item_map.drop("raw"),
        item_features=features.select("item", "category").sort("item"),
    )


def _cached(directory: Path, name: str) -> SessionData:
    d = Path(directory)
    files = [_views_file(d), d / "product-categories.csv"]
    tables = cached_tables(name, files, READER_VERSION, lambda: read_sessions(d, name).to_tables())
    return SessionData.from_tables(name, tables)


def load_sessions(
    name: str = DIGINETICA_SAMPLE.name, root: str | Path | None = None, download: bool = False
) -> SessionData:
    """Session events of a registered session dataset.

    Args:
        name: (str) dataset name; ``"session-diginetica-sample"``.
        root: (str | Path | None) directory holding ``<name>/``; default ``$SPARROW_DATA_DIR``.
        download: (bool) accepted for symmetry; DIGINETICA has no public download URL.

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: the files are missing (the message says how to get them).
        DataFormatError: a file is malformed (file, line and what was expected).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown session dataset {name!r}; known: {sorted(SOURCES)}")
    return _cached(resolve_dataset_dir(SOURCES[name], root, download), name)


def load_diginetica(directory: Path) -> InteractionData:
    """DIGINETICA from ``directory`` as interactions (sessions as users), through the cache."""
    return _cached(directory, DIGINETICA_SAMPLE.name).to_interactions()


__all__ = ["DIGINETICA_SAMPLE", "SOURCES", "SessionData", "load_diginetica", "load_sessions", "read_sessions"]
