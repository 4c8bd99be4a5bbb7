"""The canonical interaction table every reader returns, and the strict text parsing they share.

Every reader turns its dataset's files into one :class:`InteractionData`: interactions with
contiguous ids, the raw-id maps, optional user/item features and extra tables. Files are
parsed line by line with polars, and every value is validated; a bad value raises
:class:`~retrieval.data.errors.DataFormatError` naming the file, the 1-based line and what
was expected. Polars' own parse errors never reach the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from retrieval.data.errors import DataFormatError

log = logging.getLogger(__name__)

LINE = "_line"  # 1-based line number of the row in its file, kept while validating

INTERACTION_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.Int64(),
    "item": pl.Int64(),
    "rating": pl.Float32(),
    "timestamp": pl.Int64(),
    "split": pl.Utf8(),
}


@dataclass(frozen=True)
class InteractionData:
    """A dataset's interactions with contiguous ids, its id maps and side information.

    Attributes:
        name: (str) registered dataset name, e.g. ``"movielens-100k"``.
        interactions: (pl.DataFrame) one row per interaction, columns
            ``user`` Int64 in ``[0, num_users)``, ``item`` Int64 in ``[0, num_items)``,
            ``rating`` Float32 (null for implicit feedback), ``timestamp`` Int64 (null when
            unknown; the unit is the dataset's, documented by its reader), ``split`` Utf8
            (``"train"``/``"test"`` when the dataset ships a split, else null).
        num_users: (int) number of users; ids are ``0..num_users-1``.
        num_items: (int) number of items; ids are ``0..num_items-1``.
        user_map: (pl.DataFrame) ``raw_id`` Utf8 (the id in the files), ``user`` Int64.
        item_map: (pl.DataFrame) ``raw_id`` Utf8, ``item`` Int64.
        user_features: (pl.DataFrame | None) ``user`` + feature columns, one row per user.
        item_features: (pl.DataFrame | None) ``item`` + feature columns, one row per item.
        extra: (dict[str, pl.DataFrame]) further tables, e.g. Coat's ``propensities``.
    """

    name: str
    interactions: pl.DataFrame
    num_users: int
    num_items: int
    user_map: pl.DataFrame
    item_map: pl.DataFrame
    user_features: pl.DataFrame | None = None
    item_features: pl.DataFrame | None = None
    extra: dict[str, pl.DataFrame] = field(default_factory=dict)

    def __post_init__(self) -> None:
        schema = dict(self.interactions.schema)
        if schema != INTERACTION_SCHEMA:
            raise ValueError(f"{self.name}: interactions schema must be {INTERACTION_SCHEMA}, got {schema}")
        if self.user_map.height != self.num_users or self.item_map.height != self.num_items:
            raise ValueError(
                f"{self.name}: maps have {self.user_map.height} users / {self.item_map.height} items, "
                f"expected {self.num_users} / {self.num_items}"
            )

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, interactions={self.interactions.height}, "
            f"users={self.num_users}, items={self.num_items}, extra={sorted(self.extra)})"
        )

    def to_tables(self) -> dict[str, pl.DataFrame]:
        """The tables to cache: ``interactions``, the maps, features and ``extra__<key>``."""
        tables = {"interactions": self.interactions, "user_map": self.user_map, "item_map": self.item_map}
        if self.user_features is not None:
            tables["user_features"] = self.user_features
        if self.item_features is not None:
            tables["item_features"] = self.item_features
        tables.update({f"extra__{k}": v for k, v in self.extra.items()})
        return tables

    @classmethod
    def from_tables(cls, name: str, tables: Mapping[str, pl.DataFrame]) -> InteractionData:
        """Inverse of :meth:`to_tables`."""
        return cls(
            name=name,
            interactions=tables["interactions"],
            num_users=tables["user_map"].height,
            num_items=tables["item_map"].height,
            user_map=tables["user_map"],
            item_map=tables["item_map"],
            user_features=tables.get("user_features"),
            item_features=tables.get("item_features"),
            extra={k.removeprefix("extra__"): v for k, v in tables.items() if k.startswith("extra__")},
        )


# --------------------------------------------------------------------------- ids


def id_map(raw: pl.Series, column: str) -> pl.DataFrame:
    """Contiguous ids for the distinct raw ids, in increasing raw-id order.

    Args:
        raw: (pl.Series) raw ids (integers), duplicates allowed.
        column: (str) name of the new id column, ``"user"`` or ``"item"``.

    Returns:
        ``raw`` (the raw id, same dtype), ``raw_id`` Utf8 and ``column`` Int64 in ``0..n-1``.
    """
    distinct = raw.unique().sort()
    return pl.DataFrame(
        {
            "raw": distinct,
            "raw_id": distinct.cast(pl.Utf8),
            column: pl.int_range(distinct.len(), eager=True, dtype=pl.Int64),
        }
    )


def interaction_frame(df: pl.DataFrame, user_map: pl.DataFrame, item_map: pl.DataFrame) -> pl.DataFrame:
    """Map ``raw_user``/``raw_item`` to contiguous ids and give the canonical schema.

    ``df`` must hold ``raw_user`` and ``raw_item``; ``rating``, ``timestamp`` and ``split``
    are optional (null when missing). Row order is kept.
    """
    out = df.join(
        user_map.select(pl.col("raw").alias("raw_user"), "user"),
        on="raw_user",
        how="left",
        maintain_order="left",
    ).join(
        item_map.select(pl.col("raw").alias("raw_item"), "item"),
        on="raw_item",
        how="left",
        maintain_order="left",
    )
    cols = []
    for name, dtype in INTERACTION_SCHEMA.items():
        if name in out.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    return out.select(cols)


# --------------------------------------------------------------------------- strict parsing


def read_lines(path: Path, encoding: str = "utf-8") -> pl.DataFrame:
    """The non-blank lines of a text file with their 1-based numbers.

    Lines are split on ``\\n`` only (a trailing ``\\r`` is dropped), so a latin-1 byte that
    decodes to a Unicode line separator cannot shift line numbers.

    Returns:
        ``_line`` Int64 and ``text`` Utf8.

    Raises:
        DataFormatError: the file is not valid ``encoding``.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(path, line, f"{encoding} text", repr(data[e.start : e.end])) from None
    lines = pl.Series("text", text.split("\n"), dtype=pl.Utf8)
    df = pl.DataFrame(
        {LINE: pl.int_range(1, lines.len() + 1, eager=True, dtype=pl.Int64), "text": lines}
    ).with_columns(pl.col("text").str.strip_suffix("\r"))
    return df.filter(pl.col("text").str.strip_chars().str.len_bytes() > 0)


def _first_bad(df: pl.DataFrame, bad: pl.Expr, path: Path, expected: str, shown: pl.Expr) -> None:
    """Raise for the first row where ``bad`` holds, showing ``shown``."""
    hit = df.filter(bad).sort(LINE).head(1)
    if hit.height:
        raise DataFormatError(path, int(hit[LINE][0]), expected, str(hit.select(shown).item()))


def check_header(lines: pl.DataFrame, path: Path, expected: str) -> pl.DataFrame:
    """Check that the first line is ``expected`` and return the remaining lines."""
    if lines.height == 0:
        raise DataFormatError(path, None, f"a header {expected!r} and data lines", "an empty file")
    first = lines.row(0, named=True)
    if first["text"].strip().lstrip("\ufeff") != expected:
        raise DataFormatError(path, first[LINE], f"the header {expected!r}", first["text"])
    return lines.slice(1)


def split_fields(lines: pl.DataFrame, path: Path, sep: str, names: Sequence[str]) -> pl.DataFrame:
    """Split each line on ``sep`` into exactly ``len(names)`` string columns.

    Raises:
        DataFormatError: a line has a different number of fields.
    """
    n = len(names)
    parts = lines.select(LINE, "text", pl.col("text").str.split(sep).alias("_f"))
    _first_bad(
        parts,
        pl.col("_f").list.len() != n,
        path,
        f"{n} fields separated by {sep!r} ({', '.join(names)})",
        pl.col("text"),
    )
    return parts.select(LINE, *[pl.col("_f").list.get(i).alias(c) for i, c in enumerate(names)])


def split_whitespace(lines: pl.DataFrame) -> pl.DataFrame:
    """``_line`` and ``_f``: each line's whitespace-separated tokens as a list."""
    return lines.select(LINE, pl.col("text").str.extract_all(r"\S+").alias("_f"))


def parse_int(
    df: pl.DataFrame,
    column: str,
    path: Path,
    what: str,
    lo: int | None = None,
    hi: int | None = None,
    nullable: bool = False,
) -> pl.DataFrame:
    """Cast a string column to Int64, raising at the first value that is not an integer.

    With ``nullable``, null strings stay null (the caller maps its missing-value marker to null).
    """
    raw = pl.col(column)
    parsed = raw.str.strip_chars().cast(pl.Int64, strict=False)
    df = df.with_columns(parsed.alias("_v"), raw.alias("_raw"))
    bad = pl.col("_v").is_null() & (pl.col("_raw").is_not_null() if nullable else pl.lit(True))
    _first_bad(df, bad, path, f"an integer {what}", pl.col("_raw"))
    if lo is not None:
        _first_bad(df, pl.col("_v") < lo, path, f"{what} >= {lo}", pl.col("_raw"))
    if hi is not None:
        _first_bad(df, pl.col("_v") > hi, path, f"{what} <= {hi}", pl.col("_raw"))
    return df.drop(column, "_raw").rename({"_v": column})


def parse_float(
    df: pl.DataFrame, column: str, path: Path, what: str, lo: float | None = None, hi: float | None = None
) -> pl.DataFrame:
    """Cast a string column to Float64; empty, non-numeric, NaN/inf and out-of-range values raise."""
    raw = pl.col(column)
    parsed = raw.str.strip_chars().cast(pl.Float64, strict=False)
    df = df.with_columns(parsed.alias("_v"), raw.alias("_raw"))
    bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
    _first_bad(
        df,
        pl.col("_v").is_null() | ~pl.col("_v").is_finite(),
        path,
        f"a finite number {what}{bounds}",
        pl.col("_raw"),
    )
    if lo is not None:
        _first_bad(df, pl.col("_v") < lo, path, f"{what} >= {lo}", pl.col("_raw"))
    if hi is not None:
        _first_bad(df, pl.col("_v") > hi, path, f"{what} <= {hi}", pl.col("_raw"))
    return df.drop(column, "_raw").rename({"_v": column})


def check_unique(df: pl.DataFrame, keys: Sequence[str], path: Path, what: str) -> None:
    """Raise at the first line whose ``keys`` repeat an earlier line's."""
    dup = df.sort(LINE).filter(pl.struct(keys).is_first_distinct().not_())
    if dup.height:
        row = dup.row(0, named=True)
        first = df.filter(pl.all_horizontal(pl.col(k) == row[k] for k in keys))[LINE].min()
        shown = ", ".join(f"{k}={row[k]}" for k in keys)
        raise DataFormatError(
            path, row[LINE], f"one {what} per ({', '.join(keys)})", f"{shown} again (first on line {first})"
        )


def read_matrix(path: Path, what: str, integer: bool) -> tuple[pl.DataFrame, int]:
    """A dense whitespace-separated matrix as long format ``row``, ``col``, ``value``.

    Every line must have as many values as the first one.

    Returns:
        (frame with ``_line``, ``row`` Int64, ``col`` Int64, ``value`` Int64 or Float64, number of columns)
    """
    tokens = split_whitespace(read_lines(path))
    if tokens.height == 0:
        raise DataFormatError(path, None, f"a matrix of {what}", "an empty file")
    width = tokens["_f"][0].len()
    _first_bad(
        tokens,
        pl.col("_f").list.len() != width,
        path,
        f"{width} values per line (as on the first line)",
        pl.col("_f").list.join(" "),
    )
    long = (
        tokens.with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
            pl.int_ranges(0, pl.col("_f").list.len(), dtype=pl.Int64).alias("col"),
        )
        .explode("_f", "col")
        .rename({"_f": "value"})
    )
    parse = parse_int if integer else parse_float
    return parse(long, "value", path, what), width
