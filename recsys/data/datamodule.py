"""DataModule for user-item interaction data (general, non-sequential recommendation)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader

from recsys.data.features import FeatureTable, fit_side_tables
from recsys.data.registry import load_interactions
from recsys.data.sampling import PairwiseBatches, UserBatches
from recsys.data.splitters import Split
from recsys.llm.augment import Augmentation
from retrieval.types import ItemSets

log = logging.getLogger(__name__)

Filter = Callable[[pl.DataFrame], pl.DataFrame]
Splitter = Callable[[pl.DataFrame], Split]


def compact_ids(df: pl.DataFrame) -> tuple[pl.DataFrame, torch.Tensor, torch.Tensor]:
    """Remap the users and items still present to contiguous ids (0..n-1), keeping order.

    Returns:
        (frame with new ``user``/``item`` columns, (U,) int64 dataset id of each new user id,
        (I,) int64 dataset id of each new item id)
    """
    users = df["user"].unique().sort()
    items = df["item"].unique().sort()
    umap = pl.DataFrame({"user": users, "_u": pl.int_range(users.len(), eager=True, dtype=pl.Int64)})
    imap = pl.DataFrame({"item": items, "_i": pl.int_range(items.len(), eager=True, dtype=pl.Int64)})
    out = (
        df.join(umap, on="user", how="left")
        .join(imap, on="item", how="left")
        .drop("user", "item")
        .rename({"_u": "user", "_i": "item"})
    )
    return (
        out,
        torch.from_numpy(users.to_numpy().astype("int64")),
        torch.from_numpy(items.to_numpy().astype("int64")),
    )


def pairs_fingerprint(users: torch.Tensor, items: torch.Tensor, num_items: int) -> str:
    """16 hex digits identifying a set of (user, item) pairs, whatever their order or duplicates."""
    keys = torch.unique(users.long() * num_items + items.long())  # sorted
    return hashlib.sha256(keys.numpy().tobytes()).hexdigest()[:16]


def item_sets(df: pl.DataFrame, num_users: int, num_items: int) -> ItemSets:
    """The per-user item sets of an interactions frame."""
    users = torch.from_numpy(df["user"].to_numpy().astype("int64"))
    items = torch.from_numpy(df["item"].to_numpy().astype("int64"))
    return ItemSets.from_pairs(users, items, num_users, num_items)


def popularity_tail(train_items: torch.Tensor, num_items: int, share: float) -> torch.Tensor:
    """(num_items,) bool: the long tail, the least popular items holding at most ``share`` of the positives.

    Items are ranked by their number of training positives (ascending, ties by id) and cut into
    buckets of equal interaction mass; the tail is the bottom ``share`` of that mass (e.g. 0.2: the
    bottom two of ten equal-mass buckets). Items without training positives are in the tail.

    Args:
        train_items: (E,) int64 item of each training positive.
        num_items: I.
        share: in (0, 1).
    """
    if not 0 < share < 1:
        raise ValueError(f"tail_share must be in (0, 1), got {share}")
    counts = torch.bincount(train_items, minlength=num_items)  # (I,)
    order = torch.sort(counts, stable=True).indices  # (I,) least popular first, ties by id
    mass = torch.cumsum(counts[order], 0)  # (I,) positives held by the items up to each
    tail = torch.zeros(num_items, dtype=torch.bool)
    tail[order[mass <= share * train_items.numel()]] = True
    return tail


class InteractionDataModule(L.LightningDataModule):
    """Interactions → filters → split → BPR training triples and full-sort evaluation users.

    Data flows one way: the dataset reader (cached parquet) gives the canonical
    interactions; ``filters`` run in order (e.g. implicit threshold, k-core); if they
    removed users or items, ids are compacted; ``splitter`` returns a leakage-checked
    :class:`~recsys.data.splitters.Split`.

    At validation, a user's candidates are all items minus their training items; at test,
    minus training and validation items (STYLE.md's evaluation convention).

    Args:
        dataset: registered dataset name (e.g. ``movielens-100k``).
        splitter: callable turning interactions into a Split.
        filters: callables applied in order before splitting.
        num_users: expected number of users after filtering; checked against the data
            (models get it through interpolation).
        num_items: expected number of items after filtering; checked likewise.
        root: directory holding the dataset folder (default: ``$SPARROW_DATA_DIR``).
        download: fetch the official files when missing.
        batch_size: training triples per batch.
        eval_batch_size: users per evaluation batch.
        num_negatives: negatives per positive.
        positive_draw: ``each_interaction`` (every training pair once per epoch) or
            ``uniform_users`` (LightGCN's released sampling), see :mod:`recsys.data.sampling`.
        seed: base seed of the per-epoch shuffling and negative sampling.
        augmentation_path: optional LLMRec side information for this split
            (:class:`~recsys.llm.augment.Augmentation`, written by ``python -m recsys.augment``);
            checked against the data and the training split, then available as ``augmentation``.
        user_features: optional field name -> extractor (:mod:`recsys.data.features`) of the
            dataset's user side information; the fitted :class:`~recsys.data.features.FeatureTable`
            (rows in this module's user ids) is then ``user_table``.
        item_features: the same for items (``item_table``).
        feature_ids: add each entity's id as one more field of both tables.
        tail_share: optional share of the training positives that defines the long tail
            (:func:`popularity_tail`); adds the evaluation protocol ``"tail"``: the same ranking
            over all items, with only tail items as targets (users without one are skipped).

    After :meth:`setup`, ``user_ids`` / ``item_ids`` ((U,), (I,) int64) give the dataset's id of
    every (possibly compacted) user and item id, to join side information such as titles.
    """

    def __init__(
        self,
        dataset: str,
        splitter: Splitter,
        filters: Sequence[Filter] = (),
        num_users: int | None = None,
        num_items: int | None = None,
        root: str | Path | None = None,
        download: bool = False,
        batch_size: int = 2048,
        eval_batch_size: int = 1024,
        num_negatives: int = 1,
        positive_draw: str = "each_interaction",
        seed: int = 2020,
        augmentation_path: str | Path | None = None,
        user_features: Mapping[str, str] | None = None,
        item_features: Mapping[str, str] | None = None,
        feature_ids: bool = False,
        tail_share: float | None = None,
    ):
        super().__init__()
        self.dataset, self.splitter, self.filters = dataset, splitter, list(filters)
        self.expected_users, self.expected_items = num_users, num_items
        self.root, self.download = root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_negatives, self.positive_draw, self.seed = num_negatives, positive_draw, seed
        self.augmentation_path = augmentation_path
        self.augmentation: Augmentation | None = None
        self.feature_specs = (user_features, item_features)
        self.feature_ids = feature_ids
        self.tail_share = tail_share
        self.tail_items: torch.Tensor | None = None  # (I,) bool, with tail_share
        self.user_table: FeatureTable | None = None
        self.item_table: FeatureTable | None = None
        self.split: Split | None = None
        self.num_users = self.num_items = 0

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        data = load_interactions(self.dataset, root=self.root, download=self.download)
        df = data.interactions
        for f in self.filters:
            df = f(df)
        num_users, num_items = data.num_users, data.num_items
        self.user_ids, self.item_ids = torch.arange(num_users), torch.arange(num_items)
        if df["user"].n_unique() < num_users or df["item"].n_unique() < num_items:
            df, self.user_ids, self.item_ids = compact_ids(df)
            num_users, num_items = self.user_ids.numel(), self.item_ids.numel()
        self._check_count("num_users", self.expected_users, num_users)
        self._check_count("num_items", self.expected_items, num_items)
        self.num_users, self.num_items = num_users, num_items
        self.split = self.splitter(df)
        self.train_sets = item_sets(self.split.train, num_users, num_items)
        self.val_sets = item_sets(self.split.val, num_users, num_items)
        self.test_sets = item_sets(self.split.test, num_users, num_items)
        self._exclude = {"val": self.train_sets, "test": self.train_sets.union(self.val_sets)}
        self._targets = {"val": self.val_sets, "test": self.test_sets}
        if self.tail_share is not None:
            self.tail_items = popularity_tail(self.train_pairs()[1], num_items, self.tail_share)
            self._targets |= {(k, "tail"): v.restrict(self.tail_items) for k, v in self._targets.items()}
            log.info(
                "long tail (bottom %.0f%% of training positives): %d of %d items",
                100 * self.tail_share,
                int(self.tail_items.sum()),
                num_items,
            )
        self.user_table, self.item_table = fit_side_tables(
            data, self.feature_specs, (self.user_ids, self.item_ids), self.feature_ids
        )
        if self.augmentation_path is not None:
            self.augmentation = Augmentation.load(self.augmentation_path)
            self.augmentation.check(
                num_users, num_items, self.train_fingerprint(), str(self.augmentation_path)
            )
        log.info(
            "%s: %d users, %d items; train/val/test = %d/%d/%d interactions",
            self.dataset,
            num_users,
            num_items,
            self.split.train.height,
            self.split.val.height,
            self.split.test.height,
        )

    def _check_count(self, key: str, expected: int | None, found: int) -> None:
        if expected is not None and expected != found:
            raise ValueError(
                f"data.{key}={expected} in the config, but {self.dataset} has {found} after filtering; "
                f"set data.{key}={found}"
            )

    batch_kind = "pairwise"  # what train_dataloader yields (see recsys.lit.evaluation.check_batches)

    def protocols(self) -> tuple[str, ...]:
        """The evaluation protocols: full ranking (``""``), and ``"tail"`` with ``tail_share``."""
        return ("",) if self.tail_share is None else ("", "tail")

    def _check_protocol(self, protocol: str) -> None:
        if protocol not in self.protocols():
            hint = " (set data.tail_share for 'tail')" if protocol == "tail" else ""
            raise ValueError(
                f"unknown evaluation protocol {protocol!r}; this datamodule has {self.protocols()}{hint}"
            )

    def targets(self, stage: str, protocol: str = "") -> ItemSets:
        """Ground truth of ``stage`` ("val" or "test"); with ``"tail"``, only the tail items of it."""
        self._check_protocol(protocol)
        return self._targets[stage if not protocol else (stage, protocol)]

    def exclude(self, stage: str, protocol: str = "") -> ItemSets:
        """Items never ranked at ``stage``: training items, plus validation items at test (every protocol)."""
        self._check_protocol(protocol)
        return self._exclude[stage]

    def train_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items): (E,) int64 each, the training interactions (e.g. a graph's edges)."""
        tr = self.split.train
        users = torch.from_numpy(tr["user"].to_numpy().astype("int64"))
        return users, torch.from_numpy(tr["item"].to_numpy().astype("int64"))

    def train_fingerprint(self) -> str:
        """:func:`pairs_fingerprint` of the training interactions (which split a derived file is for)."""
        return pairs_fingerprint(*self.train_pairs(), self.num_items)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Triples built on the training device (GPU when training there): no host round trip."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        users, items = self.train_pairs()
        batches = PairwiseBatches(
            users,
            items,
            self.train_sets,
            self.batch_size,
            self.num_negatives,
            self.seed,
            self._epoch,
            device,
            self.positive_draw,
        )
        return DataLoader(batches, batch_size=None)

    def _eval_loader(self, stage: str) -> DataLoader:
        users = torch.nonzero(self.targets(stage).sizes() > 0).squeeze(1)
        return DataLoader(UserBatches(users, self.eval_batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
