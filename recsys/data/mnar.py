"""DataModule for implicit feedback missing not at random, evaluated on randomly exposed items.

The setting of Saito et al. (WSDM 2020) on Coat (Schnabel et al., ICML 2016): users rated items
they chose (missing not at random, MNAR: the dataset's ``split == "train"`` rows) and items drawn
for them uniformly at random (missing at random, MAR: ``split == "test"``). A click is a rating
``>= threshold``.

* **Training**: the MNAR ratings. Pointwise batches cover every (user, item) pair with its click
  and propensity (:class:`~recsys.data.sampling.PointwiseBatches`, for :mod:`recsys.models.relmf`);
  pairwise batches are BPR triples over the clicks.
* **Validation / test**: each user's MAR items are split at random (``val_fraction``, ``seed``);
  targets are the clicked ones. Two protocols:

  - ``""`` (full ranking): every item minus the user's MNAR-rated items (and, at test, the
    validation MAR items);
  - ``"mar"`` (the paper's): only the user's MAR items of that stage are ranked.

* **Overlap**: a pair rated in both parts (366 in Coat) is dropped from training
  (``overlap="drop_train"``, default: the MAR test stays whole) or from the MAR part
  (``"drop_test"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader

from recsys.data.datamodule import item_sets
from recsys.data.features import FeatureTable, fit_side_tables
from recsys.data.registry import load_interactions
from recsys.data.sampling import PairwiseBatches, PointwiseBatches, UserBatches
from recsys.propensity import Propensity, check_clicked
from retrieval.types import ItemSets

log = logging.getLogger(__name__)

PROTOCOLS = ("", "mar")
OVERLAPS = ("drop_train", "drop_test")
TRAININGS = ("pointwise", "pairwise")


def split_per_user(df: pl.DataFrame, fraction: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each user's rows cut at random: ``round(n * fraction)`` of them first, the rest second."""
    rng = np.random.default_rng(seed)
    df = df.sort("user", "item").with_columns(pl.Series("_r", rng.random(df.height)))
    df = df.with_columns(
        pl.col("_r").rank("ordinal").over("user").alias("_pos"), pl.len().over("user").alias("_n")
    )
    first = pl.col("_pos") <= (pl.col("_n") * fraction).round()
    return df.filter(first).drop("_r", "_pos", "_n"), df.filter(~first).drop("_r", "_pos", "_n")


class MNARDataModule(L.LightningDataModule):
    """MNAR training ratings, MAR validation and test (see the module docstring).

    Args:
        dataset: registered dataset with ``split`` ``"train"`` (MNAR) and ``"test"`` (MAR) rows.
        propensity: estimator, called ``(users, items, num_users, num_items, data)`` with the
            clicked training pairs (:mod:`recsys.propensity`).
        threshold: a rating ``>= threshold`` is a click.
        val_fraction: share of each user's MAR items for validation, in (0, 1).
        overlap: ``"drop_train"`` or ``"drop_test"``.
        training: ``"pointwise"`` (all pairs, with propensities) or ``"pairwise"`` (BPR triples).
        root, download: where the dataset lives; fetch it when missing.
        num_users, num_items: expected sizes, checked.
        batch_size: training pairs (or triples) per batch.
        eval_batch_size: users per evaluation batch.
        num_negatives: negatives per BPR triple.
        seed: seed of the MAR split and of the batches.
        user_features, item_features, feature_ids: side-information tables, as for
            :class:`~recsys.data.datamodule.InteractionDataModule` (``user_table`` / ``item_table``).
    """

    def __init__(
        self,
        dataset: str,
        propensity: Callable[..., Propensity],
        threshold: float = 4.0,
        val_fraction: float = 0.5,
        overlap: str = "drop_train",
        training: str = "pointwise",
        root: str | Path | None = None,
        download: bool = False,
        num_users: int | None = None,
        num_items: int | None = None,
        batch_size: int = 4096,
        eval_batch_size: int = 1024,
        num_negatives: int = 1,
        seed: int = 2020,
        user_features: Mapping[str, str] | None = None,
        item_features: Mapping[str, str] | None = None,
        feature_ids: bool = False,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        if training not in TRAININGS:
            raise ValueError(f"training must be one of {TRAININGS}, got {training!r}")
        self.dataset, self.propensity_factory, self.threshold = dataset, propensity, threshold
        self.val_fraction, self.overlap, self.training = val_fraction, overlap, training
        self.root, self.download = root, download
        self.expected = {"num_users": num_users, "num_items": num_items}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_negatives, self.seed = num_negatives, seed
        self.propensity: Propensity | None = None
        self.num_users = self.num_items = 0
        self.feature_specs, self.feature_ids = (user_features, item_features), feature_ids
        self.user_table: FeatureTable | None = None
        self.item_table: FeatureTable | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.propensity is not None:
            return
        data = load_interactions(self.dataset, root=self.root, download=self.download)
        df = data.interactions
        mnar, mar = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "test")
        if not mnar.height or not mar.height:
            raise ValueError(
                f"{self.dataset} needs 'train' (MNAR) and 'test' (MAR) rows; "
                f"it has {mnar.height} and {mar.height}"
            )
        both = mnar.join(mar, on=["user", "item"], how="semi")
        if self.overlap == "drop_train":
            mnar = mnar.join(mar, on=["user", "item"], how="anti")
        else:
            mar = mar.join(mnar, on=["user", "item"], how="anti")
        log.info("%s: %d pairs rated in both parts, dropped (%s)", self.dataset, both.height, self.overlap)
        self.num_users, self.num_items = data.num_users, data.num_items
        self.user_ids, self.item_ids = (
            torch.arange(self.num_users),
            torch.arange(self.num_items),
        )  # not renumbered
        for key, found in (("num_users", self.num_users), ("num_items", self.num_items)):
            if self.expected[key] is not None and self.expected[key] != found:
                raise ValueError(
                    f"data.{key}={self.expected[key]} in the config, but {self.dataset} has {found}"
                )
        self.user_table, self.item_table = fit_side_tables(
            data, self.feature_specs, (self.user_ids, self.item_ids), self.feature_ids
        )
        val, test = split_per_user(mar, self.val_fraction, self.seed)
        self.clicks = self._sets(self._clicked(mnar))
        self.rated = self._sets(mnar)
        self.candidates = {"val": self._sets(val), "test": self._sets(test)}
        self.relevant = {"val": self._sets(self._clicked(val)), "test": self._sets(self._clicked(test))}
        self._full_exclude = {"val": self.rated, "test": self.rated.union(self.candidates["val"])}
        self._mar_exclude = {s: _complement(c) for s, c in self.candidates.items()}
        users, items = self.clicks.row_ids(), self.clicks.indices
        self.propensity = self.propensity_factory(users, items, self.num_users, self.num_items, data)
        check_clicked(self.propensity, users, items)
        log.info(
            "%s: %d users, %d items; %d MNAR ratings (%d clicks), MAR val/test %d/%d (clicks %d/%d); "
            "propensity: %s",
            self.dataset,
            self.num_users,
            self.num_items,
            mnar.height,
            self.clicks.indices.numel(),
            val.height,
            test.height,
            self.relevant["val"].indices.numel(),
            self.relevant["test"].indices.numel(),
            self.propensity.name,
        )

    @property
    def batch_kind(self) -> str:
        """What train_dataloader yields: ``"pointwise"`` or ``"pairwise"`` (the ``training`` argument)."""
        return self.training

    def _sets(self, frame: pl.DataFrame) -> ItemSets:
        return item_sets(frame, self.num_users, self.num_items)

    def _clicked(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.filter(pl.col("rating") >= self.threshold)

    def targets(self, stage: str, protocol: str = "") -> ItemSets:
        """The clicked MAR items of ``stage`` (the same for both protocols)."""
        _check_protocol(protocol)
        return self.relevant[stage]

    def exclude(self, stage: str, protocol: str = "") -> ItemSets:
        """Items not ranked: see the module docstring's protocols."""
        _check_protocol(protocol)
        return (self._mar_exclude if protocol == "mar" else self._full_exclude)[stage]

    def train_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items): (E,) int64 each, the clicked training pairs."""
        return self.clicks.row_ids(), self.clicks.indices

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.training == "pointwise":
            batches = PointwiseBatches(
                self.clicks, self.propensity.table, self.batch_size, self.seed, self._epoch, device
            )
        else:
            users, items = self.train_pairs()
            batches = PairwiseBatches(
                users, items, self.clicks, self.batch_size, self.num_negatives, self.seed, self._epoch, device
            )
        return DataLoader(batches, batch_size=None)

    def _eval_loader(self, stage: str) -> DataLoader:
        users = torch.nonzero(self.relevant[stage].sizes() > 0).squeeze(1)
        return DataLoader(UserBatches(users, self.eval_batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; this datamodule has {PROTOCOLS}")


def _complement(sets: ItemSets) -> ItemSets:
    """Every item not in each user's set."""
    member = torch.zeros(sets.num_users, sets.num_items, dtype=torch.bool)
    member[sets.row_ids(), sets.indices] = True
    users, items = (~member).nonzero(as_tuple=True)
    return ItemSets.from_pairs(users, items, sets.num_users, sets.num_items)
