"""Item sequences for next-item recommendation: SASRec (item ids) and M2TRec (item metadata only).

A sequence is a user's interactions in time order (MovieLens: ``timestamp``, ties in file order)
or one session's events (DIGINETICA: ``time`` within the session). From the raw events:

1. every sequence is sorted (sequences whose input order differed are counted as ``reordered``);
   sequences shorter than 2 are dropped (``short_dropped``) and the items still present get
   contiguous ids ``0..num_items-1`` (:attr:`SequenceDataModule.item_ids` gives the dataset's ids);
2. with ``cold_share > 0``, ``round(cold_share * num_items)`` *cold* items are drawn (seeded) and
   every event of them is removed before splitting, so no cold item is ever in a training row or
   a validation / main test history. Each occurrence of a cold item after at least one non-cold
   event becomes a test example of the ``"cold"`` protocol: history = the non-cold events before
   it, target = the cold item (examples from every sequence, in order);
3. the split: ``leave_one_out`` (with horizon ``h``, per sequence ``s`` of length ``n >= 2h + 1``:
   training row ``s[:-2h]``, validation ``s[:-2h] -> s[-2h]``, test ``s[:-h] -> s[-h]``; shorter
   sequences of at least 2: training only; ``h = 1`` is the usual leave-one-out) or
   ``session_time`` (whole sequences ordered by (first event date, id): the last ``test_share``
   test, the ``val_share`` before them validation, the rest training; every position ``t >= 1``
   of an evaluation sequence is one row ``s[:t] -> s[t]``).
4. with ``horizon`` ``h > 1``, every evaluation row also has its *future*: the next ``h`` items
   from the target on (``leave_one_out``: exactly the ``h`` held-out items; ``session_time``: up
   to ``h`` items of the rest of the session). They are the targets of the ``"session"``
   protocol, for models that generate a list of the next items at once (session-wise generation).

Training rows keep their last ``max_len + 1`` items (``truncated``), histories their last
``max_len`` (``truncated_histories``); both are left-padded with :data:`PAD`. Evaluation ranks
every item: histories are *not* masked (the usual sequential convention), so :meth:`exclude` is
``None``.

Engagement: each training row's items carry a flag (``train_engaged``): a MovieLens rating of at
least ``liked_min_rating``, and every event of a session (a click). Only training rows' own
events are read, so nothing of validation or test leaks into it; a reward model trains on it.

Item metadata (:class:`ItemMetadata`) is what an item-ID-free model sees; items with identical
metadata are counted (``collisions``) and warned about, since only an ID (hybrid) model can tell
them apart. Missing metadata is an explicit unknown value (index 0, all-zero vectors), counted
as ``missing_metadata``; MovieLens-100K's ``unknown`` genre and title are such markers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from recsys.data.diginetica import SessionData
from recsys.data.registry import SESSION_DATASETS, load_interactions, load_sessions
from recsys.data.sampling import UserBatches, epoch_order
from recsys.data.tables import InteractionData
from retrieval.types import ItemSets

log = logging.getLogger(__name__)

PAD = -1
"""Left padding of every history and training row."""

SPLITS = ("leave_one_out", "session_time")
UNKNOWN = "unknown"  # MovieLens-100K's explicit marker of a missing genre / title
TEXT_DIM = 384  # all-MiniLM-L6-v2


@dataclass(frozen=True)
class ItemMetadata:
    """Per-item side information, rows in the datamodule's item ids.

    Attributes:
        fields: (I, F) int64 categorical fields; 0 = unknown/missing, values in ``[0, vocab_sizes[f])``.
        field_names: (tuple[str, ...]) name of each field, e.g. ``("year",)``.
        vocab_sizes: (tuple[int, ...]) per field, counting slot 0.
        bags: (I, B) int64 multi-valued field (ML-100K genres), 0-padded, values in ``[1, bag_vocab)``;
            (I, 0) if none.
        bag_vocab: (int) size of the bag vocabulary counting slot 0; 1 if none.
        text: (I, 384) float32 unit vectors of the title by all-MiniLM-L6-v2 (all-zero for a missing
            title), or None if the data has no text.
        categories: (I, C) float32 multi-hot labels of the category task (ML-100K: genres; DIGINETICA:
            its category); all-zero = unknown.
        collisions: (int) items whose metadata (fields, bags, text) is identical to another item's.
    """

    fields: Tensor
    field_names: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    bags: Tensor
    bag_vocab: int
    text: Tensor | None
    categories: Tensor
    collisions: int


# --------------------------------------------------------------------------- metadata


def _categorical(values: pl.Series) -> tuple[Tensor, int]:
    """(I,) int64 index of each value (sorted distinct non-null values -> 1.., null -> 0), vocab size."""
    vocab = values.drop_nulls().unique().sort()
    lookup = pl.DataFrame({"v": vocab, "_i": pl.int_range(1, vocab.len() + 1, eager=True, dtype=pl.Int64)})
    idx = pl.DataFrame({"v": values}).join(lookup, on="v", how="left", maintain_order="left")["_i"]
    return torch.from_numpy(idx.fill_null(0).to_numpy().astype("int64")), vocab.len() + 1


def _multi_hot(index: Tensor, width: int) -> Tensor:
    """(I, width) float32 one-hot of ``index - 1`` per row (0: all-zero)."""
    out = torch.zeros(index.numel(), width + 1)
    out[torch.arange(index.numel()), index] = 1.0
    return out[:, 1:]


def count_collisions(fields: Tensor, bags: Tensor, text: Tensor | None) -> int:
    """Items whose (fields, bags, text) row equals another item's (each member of a group counts)."""
    parts = [fields, bags]
    if text is not None:
        parts.append(text.contiguous().view(torch.int32).long())  # exact equality of the floats
    key = torch.cat(parts, dim=1)  # (I, F + B + 384)
    if key.shape[0] == 0:
        return 0
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def movielens_metadata(features: pl.DataFrame, encode: Callable[[Sequence[str]], Tensor] | None) -> tuple:
    """Fields ``(year,)``, bags and categories = genres, text = MiniLM of the title.

    Args:
        features: item features in item order with ``title`` Utf8, ``genres`` list[str], ``year``.
        encode: texts -> (n, 384) unit vectors; ``None``: no text.

    Returns:
        (ItemMetadata, number of items with any missing value).
    """
    year, year_vocab = _categorical(features["year"])
    genres = [[g for g in row or [] if g and g != UNKNOWN] for row in features["genres"].to_list()]
    names = sorted({g for row in genres for g in row})
    code = {g: i + 1 for i, g in enumerate(names)}
    rows = [sorted({code[g] for g in row}) for row in genres]
    width = max((len(r) for r in rows), default=0)
    bags = torch.zeros(len(rows), width, dtype=torch.int64)  # (I, B)
    for i, r in enumerate(rows):
        bags[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    categories = torch.zeros(len(rows), len(names) + 1)  # (I, C + 1), column 0 = padding
    categories.scatter_(1, bags, 1.0)
    titles = features["title"]
    has_title = (titles.is_not_null() & (titles.str.strip_chars() != "") & (titles != UNKNOWN)).to_list()
    text = None
    if encode is not None:
        text = torch.zeros(len(rows), TEXT_DIM)  # (I, 384), missing title: all-zero
        known = [t for t, ok in zip(titles.to_list(), has_title, strict=True) if ok]
        if known:
            text[torch.tensor(has_title)] = encode(known).float()
    missing = sum(y == 0 or not r or not t for y, r, t in zip(year.tolist(), rows, has_title, strict=True))
    meta = ItemMetadata(
        fields=year[:, None],
        field_names=("year",),
        vocab_sizes=(year_vocab,),
        bags=bags,
        bag_vocab=len(names) + 1,
        text=text,
        categories=categories[:, 1:],
        collisions=count_collisions(year[:, None], bags, text),
    )
    return meta, missing


def category_metadata(features: pl.DataFrame) -> tuple:
    """Fields ``(category,)`` (null -> 0), no bags, no text, categories = one-hot of the category.

    Returns:
        (ItemMetadata, number of items without a category).
    """
    category, vocab = _categorical(features["category"])
    fields = category[:, None]  # (I, 1)
    bags = torch.zeros(category.numel(), 0, dtype=torch.int64)
    meta = ItemMetadata(
        fields=fields,
        field_names=("category",),
        vocab_sizes=(vocab,),
        bags=bags,
        bag_vocab=1,
        text=None,
        categories=_multi_hot(category, vocab - 1),
        collisions=count_collisions(fields, bags, None),
    )
    return meta, int((category == 0).sum())


# --------------------------------------------------------------------------- sequences


def left_pad(rows: Sequence[Sequence[int]], width: int) -> Tensor:
    """(len(rows), width) int64: each row's last ``width`` items, right-aligned, :data:`PAD` before."""
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-width:]
        if len(r):
            out[i, width - len(r) :] = r
    return torch.from_numpy(out)


def ordered_sequences(events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Group events (``seq``, ``item``, ``key``, ``start``) into time-ordered sequences.

    Events are sorted by ``key`` within each ``seq``, ties in input order.

    Returns:
        (frame of ``seq``, ``items`` list[int64], ``start`` one row per sequence in ``seq`` order,
        number of sequences whose input order was not already sorted)
    """
    ranked = events.with_row_index("_row").sort("seq", "key", "_row")
    grouped = ranked.group_by("seq", maintain_order=True).agg(
        pl.col("item").alias("items"),
        pl.col("start").min(),
        (pl.col("_row").diff() < 0).any().alias("_moved"),
    )
    return grouped.drop("_moved"), int(grouped["_moved"].sum())


def remove_cold(
    sequences: Sequence[Sequence[int]], cold: Tensor, max_len: int
) -> tuple[list[list[int]], list[tuple[list[int], int, int]], int]:
    """Drop the cold items' events; each cold event after a non-cold one becomes a test row.

    Args:
        sequences: item ids of each sequence, in time order.
        cold: (I,) bool, the cold items.
        max_len: history cap.

    Returns:
        (the sequences without cold events; (history = the last ``max_len`` non-cold events
        before, cold target, sequence) per cold row; number of those histories that were cut)
    """
    is_cold = cold.tolist()
    warm, rows, cut = [], [], 0
    for seq, s in enumerate(sequences):
        kept: list[int] = []
        for item in s:
            if not is_cold[item]:
                kept.append(item)
            elif kept:
                rows.append((kept[-max_len:], item, seq))
                cut += len(kept) > max_len
        warm.append(kept)
    return warm, rows, cut


def cut_rows(
    rows: Tensor, max_len: int, horizon: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each training row at a uniform random point: (history, the next ``horizon`` items).

    Args:
        rows: (B, W) left-padded training rows, at least 2 real items each.
        max_len: history width (histories keep their last ``max_len`` items).
        horizon: future width (futures are right-padded with :data:`PAD`).
        generator: CPU generator of the cut points.

    Returns:
        (histories (B, max_len), futures (B, horizon), future_columns (B, horizon): the column of each
        future item in ``rows``, -1 at padding).
    """
    b, w = rows.shape
    n = (rows != PAD).sum(1)  # (B,) real items
    if (n < 2).any():
        raise ValueError("every training row needs at least 2 items to be cut into a history and a future")
    start = w - n  # column of the first real item
    u = torch.rand(b, generator=generator).to(rows.device)
    t = 1 + (u * (n - 1).to(u.dtype)).long().clamp(max=n - 2)  # (B,) items in the history, in [1, n - 1]
    cols = start.unsqueeze(1) + t.unsqueeze(1) - max_len + torch.arange(max_len, device=rows.device)
    histories = torch.where(cols >= start.unsqueeze(1), rows.gather(1, cols.clamp(min=0, max=w - 1)), PAD)
    fcols = start.unsqueeze(1) + t.unsqueeze(1) + torch.arange(horizon, device=rows.device)  # (B, N)
    inside = fcols < w
    futures = torch.where(inside, rows.gather(1, fcols.clamp(max=w - 1)), PAD)
    return histories, futures, torch.where(inside, fcols, -1)


class SequenceBatches(IterableDataset):
    """Shuffled batches of training rows; epoch ``e``'s order comes from a generator seeded ``seed + e``.

    Args:
        rows: (R, L + 1) int64 left-padded training rows.
        batch_size: rows per batch.
        seed: base seed.
        epoch_fn: returns the current epoch (the trainer's counter).
        device: where the batches are built and yielded.
    """

    def __init__(
        self,
        rows: Tensor,
        batch_size: int,
        seed: int,
        epoch_fn: Callable[[], int],
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.device = torch.device(device)
        self.rows = rows.to(self.device)
        self.batch_size, self.seed, self.epoch_fn = batch_size, seed, epoch_fn

    def __len__(self) -> int:
        return -(-self.rows.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = epoch_order(self.rows.shape[0], self.seed, self.epoch_fn(), self.device)  # (R,)
        for start in range(0, order.numel(), self.batch_size):
            yield {"items": self.rows[order[start : start + self.batch_size]]}  # (B, L + 1)


class SequenceDataModule(L.LightningDataModule):
    """Time-ordered item sequences → next-item training rows and evaluation (history, target) rows.

    See the module docstring for the pipeline, the splits and the cold-item protocol.

    Args:
        dataset: registered dataset name: ``movielens-100k`` (users' sequences) or
            ``session-diginetica-sample`` (sessions).
        root: directory holding the dataset folder (default: ``$SPARROW_DATA_DIR``).
        download: fetch the official files when missing.
        split: ``leave_one_out`` or ``session_time``.
        max_len: history length cap L; training rows hold L + 1 items.
        batch_size: training rows per batch.
        eval_batch_size: evaluation rows per batch.
        val_share: ``session_time`` only: share of sequences (by start) for validation, in [0, 1).
        test_share: ``session_time`` only: share of the latest sequences for test, in [0, 1).
        cold_share: share of the items held out as cold (seeded choice), in [0, 1).
        horizon: items held out per sequence for validation and for test (``leave_one_out``) and
            length of each evaluation row's future; > 1 adds the ``"session"`` protocol.
        liked_min_rating: a rated event counts as engaged from this rating on (events without a
            rating, e.g. clicks, are engaged).
        num_sequences: expected number of sequences after dropping short ones; checked.
        num_items: expected number of items in them; checked.
        text_cache: file where title vectors are cached (None: no cache file).
        seed: seed of the cold items and the per-epoch shuffling.
        num_users: alias of ``num_sequences`` (checkpoint fingerprints read ``data.num_users``);
            checked likewise when given.

    After :meth:`setup`: ``num_sequences``, ``num_items``, ``metadata`` (:class:`ItemMetadata`),
    ``cold_items`` ((K,) int64 sorted), ``item_ids`` ((I,) int64 dataset id of each item),
    ``train_rows`` ((R, max_len + 1) int64), ``train_engaged`` ((R, max_len + 1) bool, False at
    padding), ``train_sequence`` ((R,) int64 sequence of each training row), ``row_sequence``
    (stage -> (N,) int64 sequence of each evaluation row; sequences are numbered in dataset order
    of the users / sessions kept), ``split_sequences`` (``session_time`` only: stage -> sequence
    ids) and ``counts`` (also logged): ``short_dropped``, ``reordered``, ``truncated``,
    ``truncated_histories``, ``missing_metadata``, ``cold_items``, ``cold_examples``,
    ``short_after_cold`` (sequences under 2 events once cold events are gone), ``train_only``
    (leave-one-out sequences shorter than ``2 * horizon + 1``: training only), ``train_engaged``,
    ``short_train_rows`` (training rows under 2 items, dropped: they hold no
    next-item pair), ``collisions``, ``train_rows``, ``val_rows``, ``test_rows``.
    """

    batch_kind = "sequence"  # what train_dataloader yields (see recsys.lit.evaluation.check_batches)

    def __init__(
        self,
        dataset: str,
        root: str | Path | None = None,
        download: bool = False,
        split: str = "leave_one_out",
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        val_share: float = 0.1,
        test_share: float = 0.1,
        cold_share: float = 0.0,
        horizon: int = 1,
        liked_min_rating: float = 4.0,
        num_sequences: int | None = None,
        num_items: int | None = None,
        text_cache: str | Path | None = None,
        seed: int = 0,
        num_users: int | None = None,
    ):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"data.split must be one of {SPLITS}, got {split!r}")
        if max_len < 1:
            raise ValueError(f"data.max_len must be >= 1, got {max_len}")
        if horizon < 1:
            raise ValueError(f"data.horizon must be >= 1, got {horizon}")
        for key, value in (("val_share", val_share), ("test_share", test_share), ("cold_share", cold_share)):
            if not 0 <= value < 1:
                raise ValueError(f"data.{key} must be in [0, 1), got {value}")
        if val_share + test_share >= 1:
            raise ValueError(f"data.val_share + data.test_share must be < 1, got {val_share} + {test_share}")
        self.dataset, self.root, self.download = dataset, root, download
        self.split, self.max_len = split, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_share, self.test_share, self.cold_share = val_share, test_share, cold_share
        self.horizon, self.liked_min_rating = horizon, liked_min_rating
        self.expected_sequences, self.expected_items = num_sequences, num_items
        self.expected_users = num_users
        self.text_cache, self.seed = text_cache, seed
        self._data: InteractionData | SessionData | None = None
        self._ready = False
        self.num_sequences = self.num_items = 0
        self.counts: dict[str, int] = {}

    @classmethod
    def from_data(cls, data: InteractionData | SessionData, **kwargs) -> SequenceDataModule:
        """A datamodule over tables already in memory (tests, custom data); ``dataset`` = ``data.name``."""
        dm = cls(data.name, **kwargs)
        dm._data = data
        return dm

    # ----------------------------------------------------------------------- setup

    def _load(self) -> InteractionData | SessionData:
        if self._data is not None:
            return self._data
        if self.dataset in SESSION_DATASETS:
            return load_sessions(self.dataset, root=self.root, download=self.download)
        return load_interactions(self.dataset, root=self.root, download=self.download)

    def _events(self, data: InteractionData | SessionData) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(events ``seq``, ``item``, ``key``, ``start``, ``liked``; item features in dataset item order)."""
        if isinstance(data, SessionData):
            events = data.events.select(
                pl.col("session").alias("seq"),
                "item",
                pl.col("time").alias("key"),
                pl.col("date").alias("start"),
                pl.lit(True).alias("liked"),
            )
            return events, data.item_features.sort("item")
        df = data.interactions
        if df["timestamp"].null_count():
            raise ValueError(
                f"{data.name}: {df['timestamp'].null_count()} interactions have no timestamp; "
                "sequences need a time order"
            )
        events = df.select(
            pl.col("user").alias("seq"),
            "item",
            pl.col("timestamp").alias("key"),
            pl.col("timestamp").alias("start"),
            (pl.col("rating").is_null() | (pl.col("rating") >= self.liked_min_rating)).alias("liked"),
        )
        if data.item_features is None:
            raise ValueError(f"{data.name} has no item features; SequenceDataModule needs item metadata")
        return events, data.item_features.sort("item")

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        data = self._load()
        events, features = self._events(data)
        seqs, reordered = ordered_sequences(events)
        lengths = seqs["items"].list.len()
        counts = {"sequences_in": seqs.height, "reordered": reordered}
        counts["short_dropped"] = int((lengths < 2).sum())
        seqs = seqs.filter(lengths >= 2)
        # contiguous ids over the items still present, in dataset id order
        self.item_ids = torch.from_numpy(seqs["items"].explode().unique().sort().to_numpy().astype("int64"))
        num_items, num_sequences = self.item_ids.numel(), seqs.height
        self._check_count("num_sequences", self.expected_sequences, num_sequences)
        self._check_count("num_users", self.expected_users, num_sequences)
        self._check_count("num_items", self.expected_items, num_items)
        self.num_items, self.num_sequences = num_items, num_sequences
        remap = torch.full((int(self.item_ids.max()) + 1,), -1, dtype=torch.int64)
        remap[self.item_ids] = torch.arange(num_items)
        sequences = [remap[torch.tensor(s, dtype=torch.int64)].tolist() for s in seqs["items"].to_list()]

        order = pl.DataFrame({"item": self.item_ids.numpy()})  # feature rows in the new item order
        self._build_metadata(order.join(features, on="item", how="left", maintain_order="left"), counts)
        self.cold_items = self._draw_cold(num_items)
        cold = torch.zeros(num_items, dtype=torch.bool)
        cold[self.cold_items] = True
        warm, cold_rows, cut = remove_cold(sequences, cold, self.max_len)
        counts["cold_items"], counts["cold_examples"] = self.cold_items.numel(), len(cold_rows)
        counts["short_after_cold"] = sum(len(s) < 2 for s in warm)

        if self.split == "leave_one_out":
            train, val, test = self._leave_one_out(warm, counts)
        else:
            train, val, test = self._session_time(warm, seqs["start"], counts)
        counts["short_train_rows"] = sum(len(r) < 2 for r, _ in train)
        train = [(r, q) for r, q in train if len(r) >= 2]
        counts["truncated"] = sum(len(r) > self.max_len + 1 for r, _ in train)
        self.train_rows = left_pad([r for r, _ in train], self.max_len + 1)  # (R, L + 1)
        self.train_sequence = torch.tensor([q for _, q in train], dtype=torch.int64)  # (R,)
        self.train_engaged = self._engaged(events, seqs["seq"], remap)  # (R, L + 1)
        counts["train_engaged"] = int(self.train_engaged.sum())
        self._n_main_test = len(test)
        self._futures = {"val": [f for *_, f in val], "test": [f for *_, f in test] + [[]] * len(cold_rows)}
        val, test = [r[:3] for r in val], [r[:3] for r in test]
        self._rows = {"val": val, "test": test + cold_rows}
        cut += sum(len(h) > self.max_len for rows in (val, test) for h, _, _ in rows)
        counts["truncated_histories"] = cut
        self._histories = {k: left_pad([h for h, _, _ in v], self.max_len) for k, v in self._rows.items()}
        self.row_sequence = {
            k: torch.tensor([q for _, _, q in v], dtype=torch.int64) for k, v in self._rows.items()
        }
        self._targets = self._target_sets(cold_rows)
        counts |= {"train_rows": len(train), "val_rows": len(val), "test_rows": len(test)}
        self.counts = counts
        self._ready = True
        log.info(
            "%s (%s, max_len %d): %d sequences, %d items; train/val/test rows = %d/%d/%d; "
            "%d cold items, %d cold test rows; counts %s",
            self.dataset,
            self.split,
            self.max_len,
            num_sequences,
            num_items,
            len(train),
            len(val),
            len(test),
            counts["cold_items"],
            len(cold_rows),
            counts,
        )

    def _check_count(self, key: str, expected: int | None, found: int) -> None:
        if expected is not None and expected != found:
            raise ValueError(
                f"data.{key}={expected} in the config, but {self.dataset} has {found} after dropping "
                f"sequences shorter than 2; set data.{key}={found}"
            )

    def _build_metadata(self, features: pl.DataFrame, counts: dict[str, int]) -> None:
        if "category" in features.columns:
            self.metadata, missing = category_metadata(features)
        elif {"title", "genres", "year"} <= set(features.columns):
            from recsys.llm.augment import minilm_encoder

            self.metadata, missing = movielens_metadata(features, minilm_encoder(cache=self.text_cache))
        else:
            raise ValueError(
                f"{self.dataset}: item features {features.columns} have neither 'category' nor "
                "'title', 'genres', 'year'"
            )
        counts["missing_metadata"], counts["collisions"] = missing, self.metadata.collisions
        if self.metadata.collisions:
            log.warning(
                "%s: %d of %d items have metadata identical to another item's; an item-ID-free model "
                "cannot tell them apart, a hybrid (ID) model is needed for that",
                self.dataset,
                self.metadata.collisions,
                features.height,
            )

    def _draw_cold(self, num_items: int) -> Tensor:
        k = round(self.cold_share * num_items)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_items, generator=gen)[:k].sort().values  # (K,)

    def _engaged(self, events: pl.DataFrame, seq_keys: pl.Series, remap: Tensor) -> Tensor:
        """(R, L + 1) bool: is each training-row event engaged (see the module docstring)."""
        number = pl.DataFrame({"seq": seq_keys, "_q": pl.int_range(seq_keys.len(), eager=True)})
        liked = events.filter("liked").join(number, on="seq").filter(pl.col("item") <= int(remap.numel() - 1))
        items = remap[torch.from_numpy(liked["item"].to_numpy().astype("int64"))]  # (P,)
        q = torch.from_numpy(liked["_q"].to_numpy().astype("int64"))[items >= 0]
        keys = (q * self.num_items + items[items >= 0]).unique()  # sorted (sequence, item) keys
        rows = self.train_rows
        row_keys = self.train_sequence.unsqueeze(1) * self.num_items + rows.clamp(min=0)  # (R, L + 1)
        return torch.isin(row_keys, keys) & (rows != PAD)

    def _leave_one_out(self, warm: list[list[int]], counts: dict[str, int]) -> tuple[list, list, list]:
        h = self.horizon
        train, val, test = [], [], []
        for q, s in enumerate(warm):
            if len(s) >= 2 * h + 1:
                train.append((s[: -2 * h], q))
                val.append((s[: -2 * h], s[-2 * h], q, s[-2 * h : len(s) - h]))
                test.append((s[:-h], s[-h], q, s[-h:]))
            elif len(s) >= 2:
                train.append((s, q))
        counts["train_only"] = sum(2 <= len(s) < 2 * h + 1 for s in warm)
        return train, val, test

    def _session_time(self, warm: list[list[int]], start: pl.Series, counts: dict[str, int]) -> tuple:
        n = len(warm)
        order = pl.DataFrame({"start": start, "_i": pl.int_range(n, eager=True)}).sort("start", "_i")["_i"]
        n_test, n_val = round(self.test_share * n), round(self.val_share * n)
        n_train = n - n_test - n_val
        self.split_sequences = {
            "train": torch.tensor(order[:n_train].to_list(), dtype=torch.int64),
            "val": torch.tensor(order[n_train : n_train + n_val].to_list(), dtype=torch.int64),
            "test": torch.tensor(order[n_train + n_val :].to_list(), dtype=torch.int64),
        }
        counts |= {f"{k}_sequences": v.numel() for k, v in self.split_sequences.items()}
        train = [(warm[i], i) for i in self.split_sequences["train"].tolist()]
        h = self.horizon

        def rows(stage: str) -> list:
            ids = self.split_sequences[stage].tolist()
            return [
                (warm[q][:t], warm[q][t], q, warm[q][t : t + h]) for q in ids for t in range(1, len(warm[q]))
            ]

        return train, rows("val"), rows("test")

    def _target_sets(self, cold_rows: list) -> dict[tuple[str, str], ItemSets]:
        def sets(rows: list, offset: int, total: int) -> ItemSets:
            users = torch.arange(offset, offset + len(rows), dtype=torch.int64)
            items = torch.tensor([t for _, t, _ in rows], dtype=torch.int64)
            return ItemSets.from_pairs(users, items, total, self.num_items)

        def futures(stage: str) -> ItemSets:
            lists = self._futures[stage]
            users = torch.tensor([r for r, f in enumerate(lists) for _ in f], dtype=torch.int64)
            items = torch.tensor([i for f in lists for i in f], dtype=torch.int64)
            return ItemSets.from_pairs(users, items, len(lists), self.num_items)

        n_val, n_test = len(self._rows["val"]), len(self._rows["test"])
        main = self._rows["test"][: self._n_main_test]
        return {
            ("val", ""): sets(self._rows["val"], 0, n_val),
            ("val", "cold"): ItemSets.empty(n_val, self.num_items),
            ("val", "session"): futures("val"),
            ("test", ""): sets(main, 0, n_test),
            ("test", "cold"): sets(cold_rows, self._n_main_test, n_test),
            ("test", "session"): futures("test"),
        }

    # ----------------------------------------------------------------------- evaluation

    def protocols(self) -> tuple[str, ...]:
        """Next-item ranking (``""``); with ``cold_share``, also ``"cold"`` (cold test targets only); with
        ``horizon > 1``, also ``"session"`` (each row's next ``horizon`` items)."""
        return ("",) + (("cold",) if self.cold_share > 0 else ()) + (("session",) if self.horizon > 1 else ())

    def _check(self, stage: str, protocol: str) -> None:
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        if protocol not in self.protocols():
            hints = {"cold": " (set data.cold_share > 0 for 'cold')", "session": " (set data.horizon > 1)"}
            hint = hints.get(protocol, "")
            raise ValueError(
                f"unknown evaluation protocol {protocol!r}; this datamodule has {self.protocols()}{hint}"
            )

    def histories(self, stage: str) -> Tensor:
        """(N, max_len) int64 left-padded histories of every row of ``stage`` (test: main rows, then cold)."""
        self._check(stage, "")
        return self._histories[stage]

    def targets(self, stage: str, protocol: str = "") -> ItemSets:
        """One target per row of ``stage``, or none (test rows of the other protocol; ``val`` for cold)."""
        self._check(stage, protocol)
        return self._targets[stage, protocol]

    def exclude(self, stage: str, protocol: str = "") -> None:
        """Nothing is excluded: history items stay rankable (the sequential convention)."""
        self._check(stage, protocol)
        return None

    # ----------------------------------------------------------------------- loaders

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """{"items": (B, max_len + 1)} shuffled rows, built on the training device."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        batches = SequenceBatches(self.train_rows, self.batch_size, self.seed, self._epoch, device)
        return DataLoader(batches, batch_size=None)

    def _eval_loader(self, stage: str) -> DataLoader:
        rows = torch.arange(self._histories[stage].shape[0])
        return DataLoader(UserBatches(rows, self.eval_batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


__all__ = [
    "PAD",
    "ItemMetadata",
    "SequenceBatches",
    "SequenceDataModule",
    "category_metadata",
    "count_collisions",
    "cut_rows",
    "left_pad",
    "movielens_metadata",
    "ordered_sequences",
    "remove_cold",
]
