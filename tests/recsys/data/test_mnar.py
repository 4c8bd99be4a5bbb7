"""The MNAR datamodule on the real Coat files: the MAR split, both protocols' sets, the batches."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from recsys.data.mnar import MNARDataModule, split_per_user
from recsys.propensity import PropensityError, popularity, shipped, uniform


def _coat(shared_data: Path, **kwargs) -> MNARDataModule:
    dm = MNARDataModule(
        "coat", kwargs.pop("propensity", partial(popularity, eta=0.5)), root=shared_data, **kwargs
    )
    dm.setup()
    return dm


def _as_sets(sets) -> list[set[int]]:
    return [set(sets.indices[sets.indptr[u] : sets.indptr[u + 1]].tolist()) for u in range(sets.num_users)]


def test_coat_protocol_sets(shared_data: Path) -> None:
    dm = _coat(shared_data)
    assert (dm.num_users, dm.num_items) == (290, 300)
    assert dm.rated.indices.numel() == 6960 - 366  # the pairs also rated at random are dropped
    val, test = _as_sets(dm.candidates["val"]), _as_sets(dm.candidates["test"])
    rated = _as_sets(dm.rated)
    for u in range(290):
        assert len(val[u]) == len(test[u]) == 8 and not val[u] & test[u]  # 16 random items, halved
        assert not (val[u] | test[u]) & rated[u]  # the MAR part is never a training item
    for stage, cands in (("val", val), ("test", test)):
        targets = _as_sets(dm.targets(stage))
        assert all(t <= c for t, c in zip(targets, cands, strict=True))
        assert targets == _as_sets(dm.targets(stage, "mar"))
        mar_excluded = _as_sets(dm.exclude(stage, "mar"))
        assert all(m == set(range(300)) - c for m, c in zip(mar_excluded, cands, strict=True))
    assert _as_sets(dm.exclude("val")) == rated
    assert _as_sets(dm.exclude("test")) == [r | v for r, v in zip(rated, val, strict=True)]
    with pytest.raises(ValueError, match="unknown protocol 'random'"):
        dm.exclude("val", "random")


def test_the_mar_split_depends_on_the_seed_only(shared_data: Path) -> None:
    a, b, c = (_coat(shared_data, seed=s).candidates["val"] for s in (1, 1, 2))
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)


def test_pointwise_batches_cover_every_pair_once_with_clicks_and_propensities(shared_data: Path) -> None:
    dm = _coat(shared_data, batch_size=10_000)
    batches = list(dm.train_dataloader())
    users = torch.cat([b["users"] for b in batches])
    items = torch.cat([b["items"] for b in batches])
    assert torch.equal((users * 300 + items).sort().values, torch.arange(290 * 300))
    clicks = torch.cat([b["clicks"] for b in batches])
    assert clicks.sum() == dm.clicks.indices.numel() == 1814
    prop = torch.cat([b["propensity"] for b in batches])
    assert torch.equal(prop, dm.propensity.table[items])
    assert torch.equal(list(dm.train_dataloader())[0]["users"], batches[0]["users"])  # same epoch, same order


def test_shipped_and_uniform_estimators_on_coat(shared_data: Path) -> None:
    dm = _coat(shared_data, propensity=shipped)
    assert dm.propensity.table.shape == (290, 300) and bool((dm.propensity.table > 0).all())
    assert _coat(shared_data, propensity=uniform).propensity.name == "uniform (naive)"
    bad = partial(shipped, table="missing")
    with pytest.raises(PropensityError, match="ships no 'missing' table"):
        _coat(shared_data, propensity=bad)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        MNARDataModule("coat", uniform, val_fraction=1.0)
    with pytest.raises(ValueError, match="overlap must be one of"):
        MNARDataModule("coat", uniform, overlap="keep")
    with pytest.raises(ValueError, match="training must be one of"):
        MNARDataModule("coat", uniform, training="listwise")


def test_split_per_user_rounds_each_users_share() -> None:
    import polars as pl

    df = pl.DataFrame({"user": [0] * 5 + [1] * 2, "item": list(range(5)) + [0, 1]})
    first, rest = split_per_user(df, 0.5, seed=3)
    assert first.group_by("user").len().sort("user")["len"].to_list() == [2, 1]  # round(2.5) = 2 (even)
    assert first.height + rest.height == 7
