"""InteractionDataModule keeps the dataset ids of the users and items it renumbers."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import polars as pl
import torch

from recsys.data.datamodule import InteractionDataModule, compact_ids
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
