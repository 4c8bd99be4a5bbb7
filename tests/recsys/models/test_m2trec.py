import math

import pytest
import torch
from torch import Tensor

from recsys.models.m2trec import PAD, M2TRec, category_loss

N_ITEMS, D, C = 8, 16, 3


def _metadata(num_items: int = N_ITEMS, seed: int = 0) -> dict:
    """Tiny random metadata: 2 fields, a bag of width 3 (0-padded), 5-d text."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        fields=torch.stack(
            [torch.randint(4, (num_items,), generator=g), torch.randint(3, (num_items,), generator=g)], 1
        ),
        vocab_sizes=[4, 3],
        bags=torch.randint(6, (num_items, 3), generator=g),
        bag_vocab=6,
        text=torch.randn(num_items, 5, generator=g),
    )


def _model(meta: dict | None = None, **kw) -> M2TRec:
    torch.manual_seed(0)
    args = dict(
        num_items=N_ITEMS,
        num_categories=C,
        max_len=8,
        embedding_dim=D,
        num_blocks=1,
        num_heads=2,
        dropout=0.0,
    )
    return M2TRec(**(args | (meta or _metadata()) | kw)).eval()


def _cycles(batch: int, length: int, num_items: int = N_ITEMS, seed: int = 0) -> Tensor:
    """(B, length) runs i, i+1, ... (mod num_items) from a random start, left-padded to >= 2 real items."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(num_items, (batch, 1), generator=g)
    seq = (start + torch.arange(length)) % num_items  # (B, length)
    keep = torch.randint(2, length + 1, (batch, 1), generator=g)
    return seq.masked_fill(torch.arange(length) < length - keep, PAD)


def _categories(num_items: int = N_ITEMS) -> Tensor:
    """(I, C) one-hot labels: item i in category i % C."""
    return torch.nn.functional.one_hot(torch.arange(num_items) % C, C)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shapes_and_buffers(pooling: str) -> None:
    net = _model(pooling=pooling)
    items = _cycles(3, 6)
    assert net.hidden(items).shape == (3, 6, D)
    assert net.item_vectors().shape == (N_ITEMS, D)
    assert net.encode_items(items.clamp(min=0)).shape == (3, 6, D)
    assert net.score_histories(items).shape == (3, N_ITEMS)
    assert net.recommend(items, 4).shape == (3, 4)
    losses = net.losses(_cycles(3, 7), _categories())
    assert set(losses) == {"item", "category"} and all(v.shape == () for v in losses.values())
    state = net.state_dict()
    assert {"fields", "bags", "text"} <= set(state)  # metadata travels with checkpoints
    torch.testing.assert_close(state["fields"], _metadata()["fields"])


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_causality_and_left_padding(pooling: str) -> None:
    net = _model(pooling=pooling)
    items = torch.tensor([[PAD, 1, 2, 3, 4, 5]])
    changed = items.clone()
    changed[0, 3] = 7
    a, b = net.hidden(items), net.hidden(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-4)
    tight = torch.tensor([[3, 4, 5], [6, 0, 1]])
    padded = torch.cat([torch.full((2, 4), PAD), tight], dim=1)
    torch.testing.assert_close(net.score_histories(padded), net.score_histories(tight), atol=1e-5, rtol=0)
    empty = net.score_histories(torch.full((1, 4), PAD))
    assert (empty == 0).all()  # an all-padding history: finite, every item scores 0


def test_unseen_item_is_scored_from_its_metadata() -> None:
    net = _model().train()
    cold = N_ITEMS - 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5):  # train on sessions over items 0..I-2 only
        batch = _cycles(8, 5, num_items=N_ITEMS - 1, seed=step)
        assert not (batch == cold).any()
        opt.zero_grad()
        sum(net.losses(batch, _categories()).values()).backward()
        opt.step()
    net.eval()
    histories = _cycles(4, 5, num_items=N_ITEMS - 1, seed=99)
    with torch.no_grad():
        before = net.score_histories(histories)
        assert torch.isfinite(before).all()
        net.fields[cold] = (net.fields[cold] + 1) % torch.tensor([4, 3])  # change its metadata in place
        after = net.score_histories(histories)  # the cached item vectors must be refreshed
    assert not torch.allclose(before[:, cold], after[:, cold], atol=1e-5)
    torch.testing.assert_close(before[:, :cold], after[:, :cold])  # no other item moves
    # replacing the buffer (not editing it) also refreshes the cache
    meta = net.fields.clone()
    meta[cold] = torch.tensor([1, 1])  # it was [0, 0] after the edit above
    net.fields = meta
    with torch.no_grad():
        assert not torch.allclose(net.score_histories(histories)[:, cold], after[:, cold], atol=1e-5)


@pytest.mark.parametrize("use_item_ids", [False, True])
def test_identical_metadata_ties_only_without_ids(use_item_ids: bool) -> None:
    meta = _metadata()
    for key in ("fields", "bags", "text"):
        meta[key][1] = meta[key][0]  # items 0 and 1 share every attribute
    net = _model(meta, use_item_ids=use_item_ids)
    scores = net.score_histories(_cycles(4, 5, seed=3))
    tied = torch.allclose(scores[:, 0], scores[:, 1], atol=1e-6)
    assert tied != use_item_ids


def test_bag_mean_ignores_padding_and_optional_parts() -> None:
    meta = _metadata()
    meta["bags"][0] = torch.tensor([2, 0, 0])
    meta["bags"][1] = torch.tensor([2, 2, 0])  # same mean bag as item 0
    meta["fields"][1], meta["text"][1] = meta["fields"][0], meta["text"][0]
    vectors = _model(meta).item_vectors()
    torch.testing.assert_close(vectors[0], vectors[1])
    # no bag, no text: fields alone suffice; with nothing at all, ids are required
    bare = dict(meta, bags=torch.zeros(N_ITEMS, 0, dtype=torch.int64), bag_vocab=0, text=None)
    assert torch.isfinite(_model(bare).score_histories(_cycles(2, 4))).all()
    nothing = dict(bare, fields=torch.zeros(N_ITEMS, 0, dtype=torch.int64), vocab_sizes=[])
    with pytest.raises(ValueError, match="use_item_ids"):
        _model(nothing)
    assert _model(nothing, use_item_ids=True).item_vectors().shape == (N_ITEMS, D)


def test_metadata_is_checked() -> None:
    meta = _metadata()
    meta["fields"][0, 0] = 4  # vocabulary is 4: values 0..3
    with pytest.raises(ValueError, match="field 0"):
        _model(meta)
    with pytest.raises(ValueError, match="bags"):
        _model(dict(_metadata(), bag_vocab=3))


def test_category_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    labels = torch.tensor([[1, 0, 0], [1, 1, 0]])
    p = torch.sigmoid(logits)
    y = labels.float()
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).sum() / 2
    torch.testing.assert_close(category_loss(logits, labels), expected)
    # the category head starts near a 1/C prior: loss close to log C + 1 per position
    net = _model()
    start = net.losses(_cycles(16, 6), _categories())["category"].item()
    assert start == pytest.approx(math.log(C) + 1, abs=0.5)


def test_category_head_learns_the_rule() -> None:
    # sessions follow i -> i+1, so the next item's category is (last + 1) % C
    net = _model().train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(60):
        opt.zero_grad()
        net.losses(_cycles(32, 6, seed=step), _categories())["category"].backward()
        opt.step()
    net.eval()
    histories = _cycles(64, 5, seed=1000)
    with torch.no_grad():
        predicted = net.category_head(net.hidden(histories)[:, -1]).argmax(-1)
    accuracy = (predicted == (histories[:, -1] + 1) % N_ITEMS % C).float().mean().item()
    assert accuracy > 0.9


@pytest.mark.parametrize(("num_negatives", "pooling"), [(0, "mean"), (0, "last"), (4, "last")])
def test_item_loss_decreases_when_metadata_identifies_items(num_negatives: int, pooling: str) -> None:
    meta = dict(
        fields=torch.arange(1, N_ITEMS + 1)[:, None],  # one field: item id + 1 (0 is unknown)
        vocab_sizes=[N_ITEMS + 1],
        bags=torch.zeros(N_ITEMS, 0, dtype=torch.int64),
        bag_vocab=0,
        text=None,
    )
    net = _model(meta, pooling=pooling).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = []
    for step in range(80):
        opt.zero_grad()
        losses = net.losses(_cycles(32, 6, seed=step), _categories(), num_negatives=num_negatives)
        assert all(torch.isfinite(v) for v in losses.values())
        (losses["item"] + 0.5 * losses["category"]).backward()
        opt.step()
        history.append(losses["item"].item())
    assert sum(history[-10:]) / 10 < 0.3 * sum(history[:10]) / 10
    net.eval()
    histories = _cycles(64, 5, seed=1000)
    hit = (net.recommend(histories, 1)[:, 0] == (histories[:, -1] + 1) % N_ITEMS).float().mean().item()
    assert hit > 0.9


def test_no_valid_position_gives_zero_losses() -> None:
    net = _model().train()
    losses = net.losses(torch.tensor([[PAD, PAD, 3], [PAD, PAD, PAD]]), _categories())
    assert losses["item"].item() == 0.0 and losses["category"].item() == 0.0
    sum(losses.values()).backward()
