"""Feature tables: fitted vocabularies, row placement, serving-time encoding with <oov>."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from recsys.data.features import (
    COAT_ITEM,
    COAT_USER,
    ML1M_ITEM,
    ML1M_USER,
    FeatureTable,
    encode,
    fit_feature_table,
)
from recsys.data.registry import load_interactions


@pytest.fixture(scope="module")
def ml1m(shared_data: Path):
    return load_interactions("movielens-1m", root=shared_data)


@pytest.fixture(scope="module")
def coat(shared_data: Path):
    return load_interactions("coat", root=shared_data)


def _tiny() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item": [0, 1, 2],
            "kind": ["a", "b", None],
            "tags": [["x", "y"], [], ["y"]],
            "title": ["The Big One (1999)", "small one", "Big (2001) Deal (2002)"],
            "zip": ["12345", "12999", "98765"],
        }
    )


def test_ml1m_user_shapes(ml1m) -> None:
    table = fit_feature_table(ml1m.user_features, "user", ML1M_USER, ml1m.num_users)
    assert table.names == ["gender", "age", "occupation", "zip"]
    assert [f.shape for f in table.fields] == [(6040, 1)] * 4
    assert all(f.dtype == torch.int64 for f in table.fields)
    # 2 genders, 7 age codes, 21 occupations, each + <pad>, <oov>; every user has every field
    assert table.vocab_sizes[:3] == [4, 9, 23]
    assert all(bool((f[:, 0] >= 2).all()) for f in table.fields)
    assert table.oov_counts == dict.fromkeys(table.names, 0)
    assert table.row_values(0) == {"gender": ["F"], "age": ["1"], "occupation": ["10"], "zip": ["48"]}


def test_ml1m_item_fields_decode(ml1m) -> None:
    table = fit_feature_table(ml1m.item_features, "item", ML1M_ITEM, ml1m.num_items)
    assert table.num_rows == 3706
    assert table.vocab_sizes[0] == 18 + 2
    assert table.vocabularies[0][:3] == ["<pad>", "<oov>", "Action"]
    assert table.row_values(0) == {
        "genres": ["Animation", "Children's", "Comedy"],
        "title": ["toy", "story"],
        "year": ["1995"],
    }
    matrix = ml1m.item_features.filter(pl.col("title") == "Matrix, The (1999)")["item"].item()
    values = table.row_values(matrix)
    assert values["title"] == ["matrix", "the"]
    assert values["year"] == ["1999"]
    assert set(values["genres"]) == {"Action", "Sci-Fi", "Thriller"}
    # padding only after the values: id 0 never precedes a value
    genres = table.fields[0]  # (N, L)
    assert bool(((genres[:, :-1] == 0) <= (genres[:, 1:] == 0)).all())


@pytest.mark.parametrize(
    ("spec", "key", "rows", "sizes"),
    [(COAT_USER, "user", 290, [4, 8, 5, 5]), (COAT_ITEM, "item", 300, [4, 18, 15, 4])],
)
def test_coat_groups(coat, spec, key, rows, sizes) -> None:
    frame = coat.user_features if key == "user" else coat.item_features
    table = fit_feature_table(frame, key, spec, rows)
    assert table.names == list(spec)
    assert table.num_rows == rows
    # the groups cover every binary column: vocab sizes minus the 2 specials sum to the column count
    assert sum(s - 2 for s in table.vocab_sizes) == len(frame.columns) - 1 == (14 if key == "user" else 33)
    assert table.vocab_sizes == sizes
    if key == "user":
        assert table.row_values(0) == {
            "gender": ["women"],
            "age": ["20-30"],
            "location": ["urban"],
            "fashioninterest": ["very"],
        }


def test_onehot_group_multi_valued() -> None:
    frame = pl.DataFrame(
        {"user": [0, 1], "c:red": [1, 0], "c:blue": [1, 0], "s:x": [0, 1]},
        schema_overrides={"c:red": pl.Int8},
    )
    table = fit_feature_table(frame, "user", {"c": "onehot_group"}, 2)
    assert table.row_values(0) == {"c": ["red", "blue"]}
    assert table.row_values(1) == {"c": []}
    assert table.fields[0].shape == (2, 2)


def test_tiny_extractors() -> None:
    spec = {"kind": "categorical", "tags": "multi", "title": "tokens", "zip": "prefix:2"}
    table = fit_feature_table(_tiny(), "item", spec, 3)
    assert table.row_values(0) == {
        "kind": ["a"],
        "tags": ["x", "y"],
        "title": ["the", "big", "one"],
        "zip": ["12"],
    }
    assert table.row_values(1) == {"kind": ["b"], "tags": [], "title": ["small", "one"], "zip": ["12"]}
    # null gives no value; only the trailing year is removed
    assert table.row_values(2) == {"kind": [], "tags": ["y"], "title": ["big", "2001", "deal"], "zip": ["98"]}
    assert table.vocabularies[3] == ["<pad>", "<oov>", "12", "98"]


def test_encode_maps_unseen_to_oov_and_counts() -> None:
    table = fit_feature_table(_tiny(), "item", {"kind": "categorical", "tags": "multi"}, 3)
    new = pl.DataFrame({"item": [7, 8], "kind": ["a", "zzz"], "tags": [["x", "new1", "new2"], ["y"]]})
    out = encode(table, new, "item")
    assert isinstance(out, FeatureTable)
    assert out.oov_counts == {"kind": 1, "tags": 2}
    assert out.vocabularies == table.vocabularies
    kind_a = table.vocabularies[0].index("a")
    assert out.fields[0].tolist() == [[kind_a], [1]]
    x, y = (table.vocabularies[1].index(v) for v in "xy")
    assert out.fields[1].tolist() == [[x, 1, 1], [y, 0, 0]]
    assert table.oov_counts == {"kind": 0, "tags": 0}  # the fitted table is untouched


def test_encode_ml1m_new_movie(ml1m) -> None:
    table = fit_feature_table(ml1m.item_features, "item", ML1M_ITEM, ml1m.num_items)
    new = pl.DataFrame(
        {
            "item": [3706],
            "title": ["Toy Story Zorglub (2031)"],
            "genres": [["Comedy", "Space-Opera"]],
            "year": [2031],
        },
        schema_overrides={"year": pl.Int32},
    )
    out = encode(table, new, "item")
    assert out.oov_counts == {"genres": 1, "title": 1, "year": 1}
    assert out.row_values(0) == {
        "genres": ["Comedy", "<oov>"],
        "title": ["toy", "story", "<oov>"],
        "year": ["<oov>"],
    }


def test_missing_column_and_unknown_extractor() -> None:
    with pytest.raises(ValueError, match=r"'genre'.*missing.*columns: \['item', 'kind'"):
        fit_feature_table(_tiny(), "item", {"genre": "multi"}, 3)
    with pytest.raises(ValueError, match=r"unknown extractor 'bag'.*categorical"):
        fit_feature_table(_tiny(), "item", {"kind": "bag"}, 3)
    with pytest.raises(ValueError, match=r"prefix:N"):
        fit_feature_table(_tiny(), "item", {"zip": "prefix:0"}, 3)
    with pytest.raises(ValueError, match=r"group 'colour'.*groups present: \['c'\]"):
        fit_feature_table(pl.DataFrame({"user": [0], "c:red": [1]}), "user", {"colour": "onehot_group"}, 1)
    with pytest.raises(ValueError, match=r"key column 'user' missing"):
        fit_feature_table(_tiny(), "user", {"kind": "categorical"}, 3)
    with pytest.raises(ValueError, match=r"\[0, num_rows=2\)"):
        fit_feature_table(_tiny(), "item", {"kind": "categorical"}, 2)
    table = fit_feature_table(_tiny(), "item", {"kind": "categorical"}, 3)
    with pytest.raises(ValueError, match=r"'kind'.*missing"):
        encode(table, pl.DataFrame({"item": [0]}), "item")


def test_ids_remap_compacted_rows() -> None:
    # a datamodule kept dataset items 2 and 0 (in that order) and one with no features (id 9)
    ids = torch.tensor([2, 0, 9])
    table = fit_feature_table(_tiny(), "item", {"zip": "prefix:3", "tags": "multi"}, 3, ids=ids)
    assert table.row_values(0) == {"zip": ["987"], "tags": ["y"]}
    assert table.row_values(1) == {"zip": ["123"], "tags": ["x", "y"]}
    assert [f[2].tolist() for f in table.fields] == [[0], [0, 0]]
    # vocabularies are fitted on the whole frame, dataset item 1 included
    assert "129" in table.vocabularies[0]
    with pytest.raises(ValueError, match="num_rows=4"):
        fit_feature_table(_tiny(), "item", {"zip": "prefix:3"}, 4, ids=ids)


def test_with_id_field() -> None:
    table = fit_feature_table(_tiny(), "item", {"kind": "categorical"}, 3, ids=[1, 2, 0], with_id=True)
    assert table.names == ["kind", "id"]
    assert table.vocab_sizes == [4, 3 + 2]
    assert table.fields[1].tolist() == [[2], [3], [4]]
    assert table.row_values(0) == {"kind": ["b"], "id": ["0"]}
    out = encode(table, pl.DataFrame({"item": [2, 5], "kind": ["a", "a"]}), "item")
    assert out.fields[1].tolist() == [[4], [1]]
    assert out.oov_counts == {"kind": 0, "id": 1}
    with pytest.raises(ValueError, match="reserved"):
        fit_feature_table(_tiny(), "item", {"id": "categorical"}, 3, with_id=True)
