"""Coat: MNAR ratings with a missing-at-random test set.

T. Schnabel, A. Swaminathan, A. Singh, N. Chandak, T. Joachims. *Recommendations as
Treatments: Debiasing Learning and Evaluation.* ICML 2016. https://www.cs.cornell.edu/~schnabts/mnar/

Files (the Cornell release): ``train.ascii`` and ``test.ascii`` are dense 290 x 300
matrices (rows = users, columns = items; 0 = not rated, 1..5 = rating). ``train.ascii``
holds the ratings users gave to coats they chose (missing not at random, ``split="train"``),
``test.ascii`` those for coats assigned uniformly at random (``split="test"``).
``propensities.ascii`` (same shape, floats) goes to ``extra["propensities"]`` as
``user``, ``item``, ``propensity``. ``user_item_features/{user,item}_features.ascii`` are
binary matrices whose column names are the lines of ``*_features_map.txt`` (14 user and 33
item features), stored as Int8 columns.

Ids are the matrix row / column indices (``raw_id`` ``"0"``, ``"1"``, ...), so every user
and item of the matrices is present even without ratings. Note: 366 (user, item) pairs are
rated in both matrices (a user may rate a coat they chose that was also drawn at random);
:func:`recsys.data.splitters.predefined_split` reports them as leakage unless told what to
do with them.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.tables import InteractionData, read_lines, read_matrix
from retrieval.data.errors import DataFormatError
from retrieval.data.source import DatasetSource, RemoteFile, cached_tables

READER_VERSION = "coat-1"

COAT = DatasetSource(
    name="coat",
    required=("train.ascii", "test.ascii"),
    remote=(
        # No checksum is published for the Cornell zip: download=True refuses it (see the card).
        RemoteFile(
            "https://www.cs.cornell.edu/~schnabts/mnar/coat.zip",
            sha256=None,
            md5=None,
            extract=True,
            strip="coat/",
        ),
    ),
    card="datasets/coat/README.md",
)

_FEATURES = "user_item_features"


def _ratings(path: Path, split: str) -> tuple[pl.DataFrame, int, int]:
    long, width = read_matrix(path, "rating (0 = missing, 1..5)", integer=True)
    bad = long.filter((pl.col("value") < 0) | (pl.col("value") > 5)).sort("_line").head(1)
    if bad.height:
        raise DataFormatError(path, int(bad["_line"][0]), "ratings 0 (missing) or 1..5", str(bad["value"][0]))
    rows = int(long["row"].max()) + 1
    df = long.filter(pl.col("value") > 0).select(
        pl.col("row").alias("user"),
        pl.col("col").alias("item"),
        pl.col("value").cast(pl.Float32).alias("rating"),
        pl.lit(None, dtype=pl.Int64).alias("timestamp"),
        pl.lit(split).alias("split"),
    )
    return df, rows, width


def _check_shape(path: Path, rows: int, cols: int, shape: tuple[int, int]) -> None:
    if (rows, cols) != shape:
        raise DataFormatError(
            path, None, f"a {shape[0]} x {shape[1]} matrix like train.ascii", f"{rows} x {cols}"
        )


def _features(path: Path, names_path: Path, key: str, count: int) -> pl.DataFrame:
    long, width = read_matrix(path, "binary feature (0 or 1)", integer=True)
    bad = long.filter(~pl.col("value").is_in([0, 1])).sort("_line").head(1)
    if bad.height:
        raise DataFormatError(path, int(bad["_line"][0]), "binary features (0 or 1)", str(bad["value"][0]))
    rows = int(long["row"].max()) + 1
    if rows != count:
        raise DataFormatError(path, None, f"{count} rows (one per {key})", f"{rows} rows")
    names = read_lines(names_path)["text"].str.strip_chars().to_list()
    if len(names) != width or len(set(names)) != len(names):
        raise DataFormatError(
            names_path,
            None,
            f"{width} distinct feature names (one per column of {path.name})",
            f"{len(names)}",
        )
    wide = long.pivot(on="col", index="row", values="value", sort_columns=True).sort("row")
    return wide.select(
        pl.col("row").alias(key), *[pl.col(str(i)).cast(pl.Int8).alias(n) for i, n in enumerate(names)]
    )


def read_coat(directory: Path) -> InteractionData:
    """Parse Coat from its folder (no cache); see the module docstring."""
    d = Path(directory)
    train, rows, cols = _ratings(d / "train.ascii", "train")
    test, trows, tcols = _ratings(d / "test.ascii", "test")
    _check_shape(d / "test.ascii", trows, tcols, (rows, cols))
    extra = {}
    if (d / "propensities.ascii").exists():
        path = d / "propensities.ascii"
        long, width = read_matrix(path, "propensity", integer=False)
        _check_shape(path, int(long["row"].max()) + 1, width, (rows, cols))
        bad = long.filter((pl.col("value") <= 0) | (pl.col("value") > 1)).sort("_line").head(1)
        if bad.height:
            raise DataFormatError(path, int(bad["_line"][0]), "propensities in (0, 1]", str(bad["value"][0]))
        extra["propensities"] = long.select(
            pl.col("row").alias("user"), pl.col("col").alias("item"), pl.col("value").alias("propensity")
        )
    f = d / _FEATURES
    user_features = item_features = None
    if (f / "user_features.ascii").exists():
        user_features = _features(f / "user_features.ascii", f / "user_features_map.txt", "user", rows)
    if (f / "item_features.ascii").exists():
        item_features = _features(f / "item_features.ascii", f / "item_features_map.txt", "item", cols)
    ids = {n: pl.int_range(n, eager=True, dtype=pl.Int64) for n in (rows, cols)}
    return InteractionData(
        name=COAT.name,
        interactions=pl.concat([train, test]),
        num_users=rows,
        num_items=cols,
        user_map=pl.DataFrame({"raw_id": ids[rows].cast(pl.Utf8), "user": ids[rows]}),
        item_map=pl.DataFrame({"raw_id": ids[cols].cast(pl.Utf8), "item": ids[cols]}),
        user_features=user_features,
        item_features=item_features,
        extra=extra,
    )


def load_coat(directory: Path) -> InteractionData:
    """Coat from ``directory``, through the prepared-table cache."""
    d = Path(directory)
    names = [
        "train.ascii",
        "test.ascii",
        "propensities.ascii",
        f"{_FEATURES}/user_features.ascii",
        f"{_FEATURES}/user_features_map.txt",
        f"{_FEATURES}/item_features.ascii",
        f"{_FEATURES}/item_features_map.txt",
    ]
    files = [d / n for n in names if (d / n).exists()]
    tables = cached_tables(COAT.name, files, READER_VERSION, lambda: read_coat(d).to_tables())
    return InteractionData.from_tables(COAT.name, tables)


__all__ = ["COAT", "load_coat", "read_coat"]
