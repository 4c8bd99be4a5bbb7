"""Bad files and bad splits: each error names the file, the 1-based line and what was expected."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys.data import LeakageError, Split, load_interactions
from recsys.data.coat import read_coat
from recsys.data.diginetica import read_sessions
from recsys.data.gowalla import read_gowalla
from recsys.data.movielens import read_ml1m, read_ml100k
from retrieval.data.errors import DataFormatError, DatasetNotFoundError

GOOD_UDATA = "1\t10\t3\t881250949\n2\t10\t4\t891717742\n1\t20\t5\t878887116\n"


def _ml100k(tmp_path: Path, udata: str) -> Path:
    d = tmp_path / "movielens-100k"
    d.mkdir()
    (d / "u.data").write_text(udata)
    flags = "|".join(["0"] * 18 + ["1"])
    (d / "u.item").write_text(
        f"10|A (1995)|01-Jan-1995||http://x|{flags}\n20|B (1996)|01-Jan-1996||http://x|{flags}\n"
    )
    (d / "u.genre").write_text("".join(f"g{i}|{i}\n" for i in range(19)) + "\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


def _raises(fn, path: Path, line: int | None, expected: str) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn()
    err = info.value
    assert err.path == path and err.line == line, str(err)
    assert expected in str(err)
    assert str(err).startswith(f"{path}:{line}: expected" if line else f"{path}: expected")
    return err


def test_good_small_file_reads(tmp_path: Path) -> None:
    data = read_ml100k(_ml100k(tmp_path, GOOD_UDATA))
    assert (data.num_users, data.num_items, data.interactions.height) == (2, 2, 3)
    assert data.item_features["genres"].to_list() == [["g18"], ["g18"]]


@pytest.mark.parametrize(
    ("udata", "line", "expected"),
    [
        ("1\t10\t3\t881250949\n2\t10\t4\n", 2, "4 fields"),  # wrong column count
        ("1\t10\t3\t881250949\n\n1\t10\t3\t8\t9\n", 3, "4 fields"),  # blank line skipped, numbering kept
        ("1\t10\t3\t881250949\nu2\t10\t4\t891717742\n", 2, "an integer user id"),  # non-numeric id
        ("1\t10\t3\t881250949\n2\tx10\t4\t891717742\n", 2, "an integer movie id"),
        ("1\t10\tNaN\t881250949\n", 1, "a finite number rating"),  # NaN rating
        ("1\t10\t3\t881250949\n2\t10\t\t891717742\n", 2, "a finite number rating"),  # empty rating
        ("1\t10\t3\t881250949\n1\t20\t6\t891717742\n", 2, "rating <= 5.0"),  # out of range
        ("1\t10\t0\t881250949\n", 1, "rating >= 1.0"),
        ("1\t10\tfour\t881250949\n", 1, "a finite number rating"),
        ("1\t10\t3\tyesterday\n", 1, "an integer unix timestamp"),
        ("1\t10\t3\t1\n2\t20\t3\t1\n1\t10\t4\t2\n", 3, "one rating per (raw_user, raw_item)"),  # duplicate
    ],
)
def test_ml100k_bad_ratings(tmp_path: Path, udata: str, line: int, expected: str) -> None:
    d = _ml100k(tmp_path, udata)
    _raises(lambda: read_ml100k(d), d / "u.data", line, expected)


def test_ml100k_bad_item_line(tmp_path: Path) -> None:
    d = _ml100k(tmp_path, GOOD_UDATA)
    (d / "u.item").write_text("10|A (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["2"]) + "\n")
    _raises(lambda: read_ml100k(d), d / "u.item", 1, "genre flag (0 or 1) <= 1")


def test_not_utf8(tmp_path: Path) -> None:
    d = _ml100k(tmp_path, GOOD_UDATA)
    (d / "u.data").write_bytes(GOOD_UDATA.encode() + b"3\t\xff10\t4\t1\n")
    _raises(lambda: read_ml100k(d), d / "u.data", 4, "utf-8 text")


def test_ml1m_bad_line(tmp_path: Path) -> None:
    d = tmp_path / "movielens-1m"
    d.mkdir()
    (d / "ratings_notimestamp.dat").write_text("1::10::5\n1::11::5::3\n")
    (d / "movies.dat").write_text("10::A (1995)::Comedy\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    _raises(lambda: read_ml1m(d), d / "ratings_notimestamp.dat", 2, "3 fields separated by '::'")


def test_gowalla_bad_item(tmp_path: Path) -> None:
    d = tmp_path / "lightgcn-gowalla"
    d.mkdir()
    (d / "train.txt").write_text("0 1 2 3\n1 2 x3\n")
    (d / "test.txt").write_text("0 4\n1 5\n")
    _raises(lambda: read_gowalla(d), d / "train.txt", 2, "an integer item id")
    (d / "train.txt").write_text("0 1 2 3\n1 2 3\n")
    data = read_gowalla(d)  # no list files: raw ids are the file ids
    assert (data.num_users, data.num_items) == (2, 5) and data.item_map["raw_id"].to_list() == list("12345")


def test_coat_bad_matrix(tmp_path: Path) -> None:
    d = tmp_path / "coat"
    d.mkdir()
    (d / "train.ascii").write_text("0 1 0\r\n5 0 0\r\n")
    (d / "test.ascii").write_text("0 0 2\n0 3\n")
    _raises(lambda: read_coat(d), d / "test.ascii", 2, "3 values per line")
    (d / "test.ascii").write_text("0 0 2\n0 3 7\n")
    _raises(lambda: read_coat(d), d / "test.ascii", 2, "ratings 0 (missing) or 1..5")
    (d / "test.ascii").write_text("0 0 2\n0 3 0\n")
    data = read_coat(d)
    assert data.interactions.select("user", "item", "split").rows() == [
        (0, 1, "train"),
        (1, 0, "train"),
        (0, 2, "test"),
        (1, 1, "test"),
    ]


def test_diginetica_bad_rows(tmp_path: Path) -> None:
    d = tmp_path / "session-diginetica-sample"
    d.mkdir()
    (d / "product-categories.csv").write_text("itemId;categoryId\n7;1\n8;2\n")
    views = d / "sample_train-item-views.csv"
    header = "session_id;user_id;item_id;timeframe;eventdate\n"
    views.write_text(header + "1;NA;7;0;2016-05-09\n1;NA;8;10;2016-13-09\n")
    _raises(lambda: read_sessions(d), views, 3, "an eventdate YYYY-MM-DD")
    views.write_text(header + "1;NA;7;0;2016-05-09\n1;anon;8;10;2016-05-09\n")
    _raises(lambda: read_sessions(d), views, 3, "an integer user id or NA")
    views.write_text("session;user;item;time;date\n1;NA;7;0;2016-05-09\n")
    _raises(lambda: read_sessions(d), views, 1, "the header")
    views.write_text(header + "1;NA;7;0;2016-05-09\n1;3;8;10;2016-05-09\n")
    s = read_sessions(d)
    assert s.events["user"].to_list() == [None, 3] and s.item_features["category"].to_list() == [1, 2]


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_interactions("movielens-100k", root=tmp_path)
    msg = str(info.value)
    assert "movielens-100k" in msg and str(tmp_path) in msg and "u.data" in msg
    assert "download=True" in msg and "ml-100k.zip" in msg
    with pytest.raises(DatasetNotFoundError, match="no public download URL"):
        load_interactions("session-diginetica-sample", root=tmp_path)


def test_empty_split_raises() -> None:
    df = pl.DataFrame({"user": [0, 1], "item": [0, 1]})
    with pytest.raises(ValueError, match="Split.val is empty"):
        Split(df.head(1), df.clear(), df.tail(1))


def test_leakage_raises_with_count_and_example() -> None:
    train = pl.DataFrame({"user": [0, 0, 1, 2], "item": [1, 2, 3, 4]})
    val = pl.DataFrame({"user": [5], "item": [5]})
    test = pl.DataFrame({"user": [2, 1, 9], "item": [4, 3, 9]})
    with pytest.raises(
        LeakageError, match=r"train and test share 2 \(user, item\) pairs, e.g. \(user 1, item 3\)"
    ):
        Split(train, val, test)
