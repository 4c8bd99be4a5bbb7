"""Gowalla check-ins as split by NGCF (Wang et al., SIGIR 2019), reused by LightGCN (He et al., SIGIR 2020).

Files (LightGCN repository ``Data/gowalla/``): ``train.txt`` and ``test.txt``, one line per
user: ``user item item ...`` (space separated, already 0-based ids; a line may hold a user
with no items); optionally ``user_list.txt`` / ``item_list.txt`` (header ``org_id remap_id``)
giving the original Gowalla ids. Implicit feedback: ``rating`` and ``timestamp`` are null;
``split`` is ``"train"``/``"test"`` as shipped (the published 80/20 per-user split).

Ids are remapped to ``0..n-1`` in increasing order of the file ids over both files, which
is the identity for the official files (ids are already contiguous). ``raw_id`` is the
original Gowalla id from the list files when they are present, else the file id.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.tables import (
    LINE,
    InteractionData,
    check_header,
    check_unique,
    id_map,
    interaction_frame,
    parse_int,
    read_lines,
    split_fields,
    split_whitespace,
)
from retrieval.data.errors import DataFormatError
from retrieval.data.source import DatasetSource, RemoteFile, cached_tables

READER_VERSION = "gowalla-1"

_BASE = "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/gowalla/"

GOWALLA = DatasetSource(
    name="lightgcn-gowalla",
    required=("train.txt", "test.txt"),
    remote=(
        RemoteFile(_BASE + "train.txt", sha256=None, md5="5eec1eb2edb8dd648377d348b8e136cf", extract=False),
        RemoteFile(_BASE + "test.txt", sha256=None, md5="c04e2c4bcd2389f53ed8281816166149", extract=False),
        RemoteFile(
            _BASE + "user_list.txt", sha256=None, md5="f83ec6f2cd974ba6470e8808830cc144", extract=False
        ),
        RemoteFile(
            _BASE + "item_list.txt", sha256=None, md5="13b1c0d75b07b8cea9413f40042f476f", extract=False
        ),
    ),
    card="datasets/lightgcn-gowalla/README.md",
)


def _adjacency(path: Path, split: str) -> pl.DataFrame:
    """``_line``, ``raw_user``, ``raw_item``, ``split`` from a ``user item item ...`` file."""
    tokens = split_whitespace(read_lines(path))
    users = tokens.select(LINE, pl.col("_f").list.first().alias("raw_user"))
    users = parse_int(users, "raw_user", path, "user id", lo=0)
    check_unique(users, ["raw_user"], path, "line")
    pairs = (
        tokens.select(
            LINE, pl.col("_f").list.first().alias("raw_user"), pl.col("_f").list.slice(1).alias("raw_item")
        )
        .explode("raw_item")
        .drop_nulls("raw_item")
    )
    pairs = parse_int(parse_int(pairs, "raw_user", path, "user id", lo=0), "raw_item", path, "item id", lo=0)
    check_unique(pairs, ["raw_user", "raw_item"], path, "interaction")
    return pairs.with_columns(pl.lit(split).alias("split"))


def _original_ids(path: Path, mapping: pl.DataFrame) -> pl.DataFrame:
    """Replace ``raw_id`` with the ``org_id`` of the list file (``org_id remap_id``)."""
    lines = check_header(read_lines(path), path, "org_id remap_id")
    tokens = split_whitespace(lines).select(LINE, pl.col("_f").list.join(" ").alias("text"))
    df = split_fields(tokens, path, " ", ["org_id", "raw"])
    df = parse_int(df, "raw", path, "remap_id", lo=0)
    check_unique(df, ["raw"], path, "line")
    joined = mapping.join(df.select("raw", "org_id"), on="raw", how="left", maintain_order="left")
    missing = joined.filter(pl.col("org_id").is_null())
    if missing.height:
        raise DataFormatError(
            path, None, f"a line for every id in the interactions, e.g. remap_id {missing['raw'][0]}"
        )
    return joined.with_columns(pl.col("org_id").alias("raw_id")).drop("org_id")


def read_gowalla(directory: Path) -> InteractionData:
    """Parse the LightGCN Gowalla split from its folder (no cache)."""
    d = Path(directory)
    pairs = pl.concat([_adjacency(d / "train.txt", "train"), _adjacency(d / "test.txt", "test")])
    user_map = id_map(pairs["raw_user"], "user")
    item_map = id_map(pairs["raw_item"], "item")
    if (d / "user_list.txt").exists():
        user_map = _original_ids(d / "user_list.txt", user_map)
    if (d / "item_list.txt").exists():
        item_map = _original_ids(d / "item_list.txt", item_map)
    return InteractionData(
        name=GOWALLA.name,
        interactions=interaction_frame(pairs, user_map, item_map),
        num_users=user_map.height,
        num_items=item_map.height,
        user_map=user_map.drop("raw"),
        item_map=item_map.drop("raw"),
    )


def load_gowalla(directory: Path) -> InteractionData:
    """The LightGCN Gowalla split from ``directory``, through the prepared-table cache."""
    d = Path(directory)
    files = [d / f for f in ("train.txt", "test.txt", "user_list.txt", "item_list.txt") if (d / f).exists()]
    tables = cached_tables(GOWALLA.name, files, READER_VERSION, lambda: read_gowalla(d).to_tables())
    return InteractionData.from_tables(GOWALLA.name, tables)


__all__ = ["GOWALLA", "load_gowalla", "read_gowalla"]
