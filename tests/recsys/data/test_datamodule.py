"""InteractionDataModule: the dataset ids of renumbered users and items; the long-tail protocol."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import polars as pl
import pytest
import torch

from recsys.data.datamodule import InteractionDataModule, compact_ids, popularity_tail
from recsys.data.filters import implicit
from recsys.data.splitters import random_split


def test_compact_ids_returns_the_dataset_ids_in_order() -> None:
    df = pl.DataFrame({"user": [5, 0, 2, 5], "item": [3, 1, 3, 1], "rating": [1.0, 2.0, 3.0, 4.0]})
    out, users, items = compact_ids(df)
    assert users.tolist() == [0, 2, 5] and items.tolist() == [1, 3]
    assert out["user"].to_list() == [2, 0, 1, 2] and out["item"].to_list() == [1, 0, 1, 0]


def test_filtered_ml1m_keeps_its_id_maps(shared_data: Path) -> None:
    dm = InteractionDataModule(
        "movielens-1m", random_split, filters=[partial(implicit, threshold=3)], root=shared_data
    )
    dm.setup()
    assert (dm.num_users, dm.num_items) == (dm.user_ids.numel(), dm.item_ids.numel()) == (6039, 3628)
    assert bool((dm.user_ids.diff() > 0).all()) and bool((dm.item_ids.diff() > 0).all())  # order kept
    full = InteractionDataModule("movielens-100k", random_split, root=shared_data)
    full.setup()
    assert torch.equal(full.item_ids, torch.arange(1682))


def test_popularity_tail_holds_the_least_popular_share() -> None:
    # item 0: 6 positives, item 1: 3, item 2: 1, item 3: 0; 10 in all
    items = torch.tensor([0] * 6 + [1] * 3 + [2])
    assert popularity_tail(items, 4, 0.1).tolist() == [False, False, True, True]
    assert popularity_tail(items, 4, 0.4).tolist() == [False, True, True, True]
    assert popularity_tail(items, 4, 0.39).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="tail_share"):
        popularity_tail(items, 4, 1.0)


def test_tail_protocol_keeps_only_tail_targets(shared_data: Path) -> None:
    dm = InteractionDataModule("movielens-100k", random_split, root=shared_data, tail_share=0.2)
    dm.setup()
    tail = dm.tail_items
    users, items = dm.train_pairs()
    counts = torch.bincount(items, minlength=dm.num_items)
    assert counts[tail].sum() <= 0.2 * items.numel() < counts[tail].sum() + counts[~tail].min()
    assert counts[tail].max() <= counts[~tail].min()  # the tail is the least popular items
    for stage in ("val", "test"):
        full, only_tail = dm.targets(stage), dm.targets(stage, "tail")
        assert tail[only_tail.indices].all()
        assert only_tail.indices.numel() == int(tail[full.indices].sum()) > 0
        assert dm.exclude(stage, "tail") is dm.exclude(stage)
    plain = InteractionDataModule("movielens-100k", random_split, root=shared_data)
    plain.setup()
    with pytest.raises(ValueError, match="set data.tail_share"):
        plain.targets("test", "tail")
