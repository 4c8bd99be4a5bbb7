"""SequenceDataModule: ordering, leave-one-out and session-time splits, cold items, padding, metadata."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
import torch

import recsys.llm.augment
from recsys.data.registry import load_interactions, load_sessions
from recsys.data.sequences import PAD, SequenceDataModule, count_collisions, left_pad, movielens_metadata
from recsys.data.tables import InteractionData
from tests.recsys.helpers import sessions_like


def fake_encode(texts: Sequence[str]) -> torch.Tensor:
    """(n, 384) unit vectors, a fixed function of each text (identical texts, identical vectors)."""
    rows = [torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


@pytest.fixture(scope="module")
def fake_minilm():
    """MiniLM replaced by :func:`fake_encode` (encoding all 1682 titles takes ~20 s on a CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recsys.llm.augment, "minilm_encoder", lambda cache=None, **_: fake_encode)
        yield


@pytest.fixture(scope="module")
def ml(shared_data: Path, fake_minilm) -> SequenceDataModule:
    dm = SequenceDataModule("movielens-100k", root=shared_data, cold_share=0.05, num_items=1682)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def digi(shared_data: Path) -> SequenceDataModule:
    dm = SequenceDataModule(
        "session-diginetica-sample", root=shared_data, split="session_time", max_len=20, cold_share=0.05
    )
    dm.setup()
    return dm


def unpad(row: torch.Tensor) -> list[int]:
    return row[row != PAD].tolist()


def ml_like(events: list[tuple[int, int, int]], features: dict[str, list]) -> InteractionData:
    """Synthetic ML-style data: (user, item, timestamp) rows in file order; ``features`` per item."""
    users, items, stamps = (list(c) for c in zip(*events, strict=True))
    n_users, n_items = max(users) + 1, len(features["title"])
    interactions = pl.DataFrame(
        {"user": users, "item": items, "rating": [1.0] * len(users), "timestamp": stamps, "split": None},
        schema={
            "user": pl.Int64,
            "item": pl.Int64,
            "rating": pl.Float32,
            "timestamp": pl.Int64,
            "split": pl.Utf8,
        },
    )
    return InteractionData(
        name="synthetic",
        interactions=interactions,
        num_users=n_users,
        num_items=n_items,
        user_map=pl.DataFrame({"raw_id": [str(u) for u in range(n_users)], "user": range(n_users)}),
        item_map=pl.DataFrame({"raw_id": [str(i) for i in range(n_items)], "item": range(n_items)}),
        item_features=pl.DataFrame(
            {"item": range(n_items), **features},
            schema_overrides={"genres": pl.List(pl.Utf8), "year": pl.Int32},
        ),
    )


SEVEN_ITEMS = {
    "title": ["A (1990)", "A (1990)", "B", "unknown", "C", "C", "D"],
    "genres": [["Drama"], ["Drama"], ["Drama", "Comedy"], ["unknown"], ["Drama"], ["Comedy"], []],
    "year": [1990, 1990, None, None, 1995, 1995, 1995],
}


# --------------------------------------------------------------------------- synthetic


def test_leave_one_out_orders_pads_and_truncates(fake_minilm) -> None:
    # user 0 in file order (item, time): 3@4, 0@1, 1@2, 2@2 (tie: file order), 4@5, 5@6 -> 0 1 2 3 4 5
    # user 1: 1, 2 (two items: training only); user 2: one event of item 6 (dropped, and item 6 with it)
    events = [
        (0, 3, 4),
        (0, 0, 1),
        (1, 2, 9),
        (0, 1, 2),
        (0, 2, 2),
        (2, 6, 1),
        (0, 4, 5),
        (0, 5, 6),
        (1, 1, 8),
    ]
    dm = SequenceDataModule.from_data(ml_like(events, SEVEN_ITEMS), max_len=2, num_sequences=2, num_items=6)
    dm.setup()
    assert dm.item_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert dm.train_rows.tolist() == [[1, 2, 3], [PAD, 1, 2]]  # s[:-2] = 0 1 2 3, its last max_len + 1
    assert dm.histories("val").tolist() == [[2, 3]] and dm.targets("val").indices.tolist() == [4]
    assert dm.histories("test").tolist() == [[3, 4]] and dm.targets("test").indices.tolist() == [5]
    assert dm.exclude("test") is None and dm.protocols() == ("",)
    c = dm.counts
    assert (c["short_dropped"], c["train_only"], c["truncated"], c["truncated_histories"]) == (
        1,
        1,
        1,
        2,
    )
    assert c["reordered"] == 2  # both users' rows are out of time order in the file


def test_left_pad_keeps_the_last_items() -> None:
    assert left_pad([[1, 2, 3], [4], []], 2).tolist() == [[2, 3], [PAD, 4], [PAD, PAD]]


def test_metadata_marks_unknowns_and_counts_collisions(fake_minilm) -> None:
    meta, missing = movielens_metadata(pl.DataFrame(SEVEN_ITEMS), fake_encode)
    assert meta.field_names == ("year",) and meta.vocab_sizes == (3,)  # 0 = unknown, 1990, 1995
    assert meta.fields[:, 0].tolist() == [1, 1, 0, 0, 2, 2, 2]
    bags = [[2, 0], [2, 0], [1, 2], [0, 0], [2, 0], [1, 0], [0, 0]]  # Comedy = 1, Drama = 2
    assert meta.bag_vocab == 3 and meta.bags.tolist() == bags
    assert meta.categories.tolist() == [[0, 1], [0, 1], [1, 1], [0, 0], [0, 1], [1, 0], [0, 0]]
    assert meta.text.shape == (7, 384) and meta.text.dtype == torch.float32
    assert meta.text.norm(dim=1).tolist() == pytest.approx([1, 1, 1, 0, 1, 1, 1], abs=1e-5)  # "unknown": none
    assert missing == 3  # B (no year), unknown (nothing), D (no genre)
    assert meta.collisions == 2  # items 0 and 1; 4 and 5 differ by genre
    assert count_collisions(meta.fields, meta.bags, None) == 2
    assert count_collisions(meta.fields, meta.bags[:, :0], None) == 7  # year alone: 0=1, 2=3, 4=5=6


def test_sessions_are_sorted_counted_and_short_ones_dropped() -> None:
    # session 0 out of order (times 30, 10, 20) -> items 1 2 0; session 1 has one event; session 2: 3 4
    events = [(0, 0, 30, 0), (0, 1, 10, 0), (0, 2, 20, 0), (1, 5, 0, 1), (2, 3, 0, 2), (2, 4, 5, 2)]
    data = sessions_like(events, [7, 7, None, 8, 9, 9])
    dm = SequenceDataModule.from_data(data, split="leave_one_out", max_len=5)
    dm.setup()
    assert (dm.num_sequences, dm.num_items) == (2, 5)  # item 5 only in the dropped session
    assert dm.histories("test").tolist() == [[PAD, PAD, PAD, 1, 2]]
    assert dm.targets("test").indices.tolist() == [0]
    assert dm.counts["reordered"] == 1 and dm.counts["short_dropped"] == 1
    meta = dm.metadata
    assert meta.field_names == ("category",) and meta.vocab_sizes == (4,)  # 0 = unknown, 7, 8, 9
    assert meta.fields[:, 0].tolist() == [1, 1, 0, 2, 3]
    assert meta.bags.shape == (5, 0) and meta.bag_vocab == 1 and meta.text is None
    assert meta.categories.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert dm.counts["missing_metadata"] == 1 and meta.collisions == 2  # items 0 and 1 (category 7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "random"}, "data.split must be one of"),
        ({"max_len": 0}, "data.max_len must be >= 1"),
        ({"val_share": 1.0}, r"data.val_share must be in \[0, 1\)"),
        ({"cold_share": -0.1}, r"data.cold_share must be in \[0, 1\)"),
        ({"val_share": 0.5, "test_share": 0.5}, "must be < 1"),
        ({"horizon": 0}, "data.horizon must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SequenceDataModule("movielens-100k", **kwargs)


def test_count_mismatch_and_unknown_protocol(fake_minilm) -> None:
    events = [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 3, 1), (1, 4, 2)]
    data = ml_like(events, SEVEN_ITEMS)
    with pytest.raises(ValueError, match="data.num_items=7 in the config, but synthetic has 5"):
        SequenceDataModule.from_data(data, num_items=7).setup()
    dm = SequenceDataModule.from_data(data)
    dm.setup()
    with pytest.raises(ValueError, match="set data.cold_share > 0"):
        dm.targets("test", "cold")
    with pytest.raises(ValueError, match="stage must be 'val' or 'test'"):
        dm.histories("train")


# --------------------------------------------------------------------------- MovieLens-100K


def ml_sequences(shared_data: Path) -> list[list[int]]:
    """Every user's items by timestamp, ties in file order (computed apart from the module)."""
    df = load_interactions("movielens-100k", shared_data).interactions.with_row_index("_row")
    by_user = df.sort("user", "timestamp", "_row").group_by("user", maintain_order=True).agg("item")
    return by_user["item"].to_list()


def test_leave_one_out_rows_of_one_user(ml: SequenceDataModule, shared_data: Path) -> None:
    assert (ml.num_sequences, ml.num_items) == (943, 1682)
    cold = set(ml.cold_items.tolist())
    warm = [i for i in ml_sequences(shared_data)[0] if i not in cold]  # user 0 (raw id 1), 272 ratings
    assert len(warm) > 200
    row = int(torch.nonzero(ml.row_sequence["val"] == 0))
    assert unpad(ml.train_rows[0]) == warm[:-2][-51:]
    assert unpad(ml.histories("val")[row]) == warm[:-2][-50:]
    assert ml.targets("val").rows(torch.tensor([row]))[1].tolist() == [warm[-2]]
    assert unpad(ml.histories("test")[row]) == warm[:-1][-50:]
    assert ml.targets("test").rows(torch.tensor([row]))[1].tolist() == [warm[-1]]
    assert ml.counts["short_dropped"] == 0 and ml.counts["missing_metadata"] == 2


def test_no_cold_item_is_trained_on_or_in_a_history(ml: SequenceDataModule, digi: SequenceDataModule) -> None:
    for dm in (ml, digi):
        cold = torch.zeros(dm.num_items + 1, dtype=torch.bool)  # index -1 (PAD) maps to the extra slot
        cold[dm.cold_items] = True
        assert dm.cold_items.numel() == round(0.05 * dm.num_items) > 0
        assert not cold[dm.train_rows].any()
        assert not cold[dm.histories("val")].any() and not cold[dm.histories("test")].any()
        assert not cold[dm.targets("val").indices].any() and not cold[dm.targets("test").indices].any()


def test_cold_rows_target_cold_items_after_their_history(ml: SequenceDataModule, shared_data: Path) -> None:
    assert ml.protocols() == ("", "cold")
    n_val, n_test = ml.histories("val").shape[0], ml.histories("test").shape[0]
    main, cold = ml.targets("test"), ml.targets("test", "cold")
    n_main = int((main.sizes() > 0).sum())
    assert n_main == n_val == 943 and n_test == n_main + ml.counts["cold_examples"]
    assert main.sizes()[:n_main].eq(1).all() and main.sizes()[n_main:].eq(0).all()
    assert cold.sizes()[:n_main].eq(0).all() and cold.sizes()[n_main:].eq(1).all()
    assert ml.targets("val", "cold").indices.numel() == 0
    assert torch.isin(cold.indices, ml.cold_items).all()
    cold_set, sequences = set(ml.cold_items.tolist()), ml_sequences(shared_data)
    for row in range(n_main, n_test, 37):  # a sample of the cold rows
        full = sequences[int(ml.row_sequence["test"][row])]
        target = int(cold.rows(torch.tensor([row]))[1])
        before = full[: full.index(target)]  # ML-100K rates an item once per user
        assert unpad(ml.histories("test")[row]) == [i for i in before if i not in cold_set][-50:]


def test_metadata_of_movielens(ml: SequenceDataModule) -> None:
    m = ml.metadata
    assert m.fields.shape == (1682, 1) and m.field_names == ("year",) and m.fields.max() < m.vocab_sizes[0]
    assert m.bags.shape[0] == 1682 and m.bag_vocab == 19 and 0 < m.bags.max() < m.bag_vocab  # 18 genres + pad
    assert m.text.shape == (1682, 384) and m.categories.shape == (1682, 18)
    assert m.collisions == 36  # 18 movies listed twice under the same title, genres and year


def test_train_batches_are_shuffled_per_epoch(ml: SequenceDataModule) -> None:
    ml.batch_size = 300
    loader = ml.train_dataloader()
    first, again = list(loader), list(ml.train_dataloader())
    assert len(first) == 4 and first[0]["items"].shape == (300, 51) and first[-1]["items"].shape == (43, 51)
    assert all(torch.equal(a["items"], b["items"]) for a, b in zip(first, again, strict=True))
    rows = torch.cat([b["items"] for b in first])
    assert torch.equal(rows.unique(dim=0), ml.train_rows.unique(dim=0))
    assert not torch.equal(rows, ml.train_rows)  # shuffled
    users = torch.cat([b["users"] for b in ml.test_dataloader()])
    assert torch.equal(users, torch.arange(ml.histories("test").shape[0]))


# --------------------------------------------------------------------------- DIGINETICA


def test_session_time_split_keeps_whole_sessions_in_time_order(
    digi: SequenceDataModule, shared_data: Path
) -> None:
    assert (digi.num_sequences, digi.num_items, digi.counts["short_dropped"]) == (2053, 6774, 933)
    starts = (
        load_sessions("session-diginetica-sample", shared_data)
        .events.group_by("session")
        .agg(pl.len(), pl.col("date").min())
        .filter(pl.col("len") >= 2)
        .sort("session")["date"]
        .to_list()
    )  # the start of each kept session, in sequence order
    parts = digi.split_sequences
    assert torch.cat(list(parts.values())).sort().values.tolist() == list(range(2053))
    assert parts["val"].numel() == parts["test"].numel() == round(0.1 * 2053)
    first = {k: [starts[i] for i in v.tolist()] for k, v in parts.items()}
    assert max(first["train"]) <= min(first["val"]) and max(first["val"]) <= min(first["test"])
    assert torch.isin(digi.row_sequence["val"], parts["val"]).all()
    n_main = digi.counts["test_rows"]
    assert torch.isin(digi.row_sequence["test"][:n_main], parts["test"]).all()
    # every position t >= 1 of each evaluation session is a row: rows = events - sessions (after cold removal)
    hist = digi.histories("val")
    assert hist.shape == (digi.counts["val_rows"], 20)
    assert (hist[:, -1] != PAD).all()
    m = digi.metadata
    assert m.fields.shape == (6774, 1) and m.text is None and m.categories.sum(1).eq(1).all()


def test_horizon_holds_out_the_next_items_and_flags_engagement(shared_data: Path, fake_minilm) -> None:
    dm = SequenceDataModule("movielens-100k", root=shared_data, horizon=3, num_items=1682)
    dm.setup()
    assert dm.protocols() == ("", "session")
    s = ml_sequences(shared_data)[0]  # user 0 (raw id 1), 272 ratings
    row = int(torch.nonzero(dm.row_sequence["val"] == 0))
    train_row = int(torch.nonzero(dm.train_sequence == 0))
    assert unpad(dm.train_rows[train_row]) == s[:-6][-51:]
    assert unpad(dm.histories("val")[row]) == s[:-6][-50:]
    assert unpad(dm.histories("test")[row]) == s[:-3][-50:]
    assert dm.targets("val").rows(torch.tensor([row]))[1].tolist() == [s[-6]]
    assert dm.targets("test").rows(torch.tensor([row]))[1].tolist() == [s[-3]]
    assert dm.targets("val", "session").rows(torch.tensor([row]))[1].tolist() == sorted(s[-6:-3])
    assert dm.targets("test", "session").rows(torch.tensor([row]))[1].tolist() == sorted(s[-3:])
    # engagement = a rating of 4 or 5, read from the raw file apart from the module
    ratings = load_interactions("movielens-100k", shared_data).interactions.filter(pl.col("user") == 0)
    liked = set(ratings.filter(pl.col("rating") >= 4)["item"].to_list())
    items, flags = dm.train_rows[train_row], dm.train_engaged[train_row]
    assert flags.tolist() == [i in liked and i != PAD for i in items.tolist()]
    assert 0 < int(flags.sum()) < int((items != PAD).sum())


def test_session_futures_are_the_rest_of_the_session(shared_data: Path) -> None:
    dm = SequenceDataModule(
        "session-diginetica-sample", root=shared_data, split="session_time", horizon=2, max_len=200
    )
    dm.setup()
    history, futures = dm.histories("test"), dm.targets("test", "session")
    for row in range(0, history.shape[0], 41):
        q = int(dm.row_sequence["test"][row])
        rows_of_q = torch.nonzero(dm.row_sequence["test"] == q).flatten()
        t = int((row - rows_of_q[0]).item()) + 1  # this row's history is the first t events
        session = unpad(history[rows_of_q[-1]]) + dm.targets("test").rows(rows_of_q[-1:])[1].tolist()
        assert futures.rows(torch.tensor([row]))[1].tolist() == sorted(set(session[t : t + 2]))
    assert dm.train_engaged.eq(dm.train_rows != PAD).all()  # every click is engaged


def test_real_minilm_titles_are_unit_vectors() -> None:
    features = pl.DataFrame(
        {
            "title": ["Toy Story (1995)", "Toy Story (1995)", "GoldenEye (1995)"],
            "genres": [["A"], ["A"], ["A"]],
            "year": [1995] * 3,
        }
    )
    meta, _ = movielens_metadata(features, recsys.llm.augment.minilm_encoder())
    assert meta.text.norm(dim=1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert meta.collisions == 2
