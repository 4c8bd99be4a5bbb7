import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.models.sasrec import PAD, SASRec, sampled_softmax_loss, shift

N_ITEMS, D = 7, 16


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    args = dict(num_items=N_ITEMS, max_len=8, embedding_dim=D, num_blocks=2, num_heads=2, dropout=0.0) | kw
    return SASRec(**args).eval()


def _cycles(batch: int, length: int, num_items: int = N_ITEMS, seed: int = 0) -> Tensor:
    """(B, length) runs i, i+1, ... (mod num_items) from a random start, left-padded to a random length."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(num_items, (batch, 1), generator=g)
    seq = (start + torch.arange(length)) % num_items  # (B, length)
    keep = torch.randint(2, length + 1, (batch, 1), generator=g)  # real items at the right end
    return seq.masked_fill(torch.arange(length) < length - keep, PAD)


def test_shapes() -> None:
    net = _model()
    items = _cycles(3, 6)
    assert net.hidden(items).shape == (3, 6, D)
    assert net.item_vectors().shape == (N_ITEMS, D)
    assert net.score_histories(items).shape == (3, N_ITEMS)
    top = net.recommend(items, 3)
    assert top.shape == (3, 3) and top.dtype == torch.int64
    assert net.loss(_cycles(3, 7)).shape == ()


@pytest.mark.parametrize("num_heads", [1, 2])
def test_causality(num_heads: int) -> None:
    net = _model(num_heads=num_heads)
    items = torch.tensor([[PAD, 1, 2, 3, 4, 5]])
    changed = items.clone()
    changed[0, 3] = 6
    a, b = net.hidden(items), net.hidden(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # earlier positions untouched
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-4)  # later ones do see the change


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_left_padding_invariance(dropout: float) -> None:
    net = _model(dropout=dropout)  # eval mode: dropout off
    tight = torch.tensor([[3, 4, 5], [6, 0, 1]])
    padded = torch.cat([torch.full((2, 4), PAD), tight], dim=1)  # (2, 7)
    torch.testing.assert_close(net.score_histories(padded), net.score_histories(tight), atol=1e-5, rtol=0)
    torch.testing.assert_close(net.hidden(padded)[:, 4:], net.hidden(tight), atol=1e-5, rtol=0)
    # the padding items' embedding row is zero and receives no gradient
    assert net.item.weight[N_ITEMS].abs().sum() == 0


def test_all_padding_row_is_finite_and_scores_zero() -> None:
    net = _model()
    histories = torch.tensor([[PAD] * 5, [PAD, PAD, PAD, 2, 3]])
    hidden = net.hidden(histories)
    assert torch.isfinite(hidden).all()
    assert (hidden[0] == 0).all() and (hidden[1, :3] == 0).all()  # padding positions are zero
    scores = net.score_histories(histories)
    assert (scores[0] == 0).all() and torch.isfinite(scores).all()
    assert net.recommend(histories, 2)[0].tolist() == [0, 1]  # ties broken by id
    net.train()
    loss = net.loss(torch.tensor([[PAD] * 6, [PAD, PAD, PAD, 2, 3, 4]]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # no valid position at all: a zero loss, still differentiable
    empty = net.loss(torch.tensor([[PAD, PAD, 3], [PAD] * 3]))
    assert empty.item() == 0.0 and empty.requires_grad


def test_long_histories_keep_the_last_max_len_items() -> None:
    net = _model(max_len=4)
    long = torch.tensor([[1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(net.score_histories(long), net.score_histories(long[:, -4:]))
    with pytest.raises(ValueError, match="max_len"):
        net.hidden(long)


def test_shift_marks_valid_positions() -> None:
    inputs, targets = shift(torch.tensor([[PAD, PAD, 1, 2, 3]]))
    assert inputs.tolist() == [[PAD, PAD, 1, 2]]
    assert targets.tolist() == [[PAD, PAD, 2, 3]]  # (PAD -> 1) does not count


def test_full_softmax_loss_by_hand() -> None:
    net = _model()
    items = torch.tensor([[PAD, PAD, 1, 2, 3], [4, 5, 6, 0, 1]])
    hidden = net.hidden(items[:, :-1])  # (2, 4, D)
    logits = hidden @ net.item_vectors().T  # (2, 4, I)
    rows = [(0, 2, 2), (0, 3, 3), (1, 0, 5), (1, 1, 6), (1, 2, 0), (1, 3, 1)]  # (b, t, target)
    expected = F.cross_entropy(
        torch.stack([logits[b, t] for b, t, _ in rows]), torch.tensor([y for *_, y in rows])
    )
    torch.testing.assert_close(net.loss(items), expected)


def test_held_out_items_are_no_negatives() -> None:
    net = _model()
    items = torch.tensor([[PAD, PAD, 1, 2, 3], [4, 5, 3, 0, 1]])  # item 6 appears nowhere
    known = torch.ones(N_ITEMS, dtype=torch.bool)
    known[6] = False
    hidden = net.hidden(items[:, :-1])  # (2, 4, D)
    logits = (hidden @ net.item_vectors().T)[..., known]  # (2, 4, I - 1): the known catalogue only
    rows = [(0, 2, 2), (0, 3, 3), (1, 0, 5), (1, 1, 3), (1, 2, 0), (1, 3, 1)]  # (b, t, target)
    expected = F.cross_entropy(
        torch.stack([logits[b, t] for b, t, _ in rows]), torch.tensor([y for *_, y in rows])
    )  # targets < 6 keep their column
    torch.testing.assert_close(net.loss(items, known=known), expected)
    assert not torch.allclose(net.loss(items), expected)
    for negatives in (0, 64):  # full and sampled softmax: the held-out vector learns nothing
        net.zero_grad()
        torch.manual_seed(0)
        net.loss(items, num_negatives=negatives, known=known).backward()
        assert net.item.weight.grad[6].abs().sum() == 0
        net.zero_grad()
        net.loss(items, num_negatives=negatives).backward()
        assert net.item.weight.grad[6].abs().sum() > 0


def test_sampled_loss_formula_and_target_collisions() -> None:
    g = torch.Generator().manual_seed(0)
    h, pos = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    neg = torch.randn(2, 4, generator=g)
    targets = torch.tensor([5, 1, 2])
    loss = sampled_softmax_loss(h, pos, neg, targets, torch.tensor([8, 9]))
    logits = torch.cat([(h * pos).sum(-1, keepdim=True), h @ neg.T], 1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(3, dtype=torch.int64)))
    # negative id 5 is row 0's target: it is dropped from row 0 only
    collided = sampled_softmax_loss(h, pos, neg, targets, torch.tensor([5, 9]))
    expected = torch.stack(
        [
            -torch.log_softmax(logits[0, [0, 2]], 0)[0],
            -torch.log_softmax(logits[1], 0)[0],
            -torch.log_softmax(logits[2], 0)[0],
        ]
    ).mean()
    torch.testing.assert_close(collided, expected)
    # every negative is the target: nothing to push down, zero loss
    only = sampled_softmax_loss(h[:1], pos[:1], neg, targets[:1], torch.tensor([5, 5]))
    assert only.item() == pytest.approx(0.0, abs=1e-7)


def test_sampled_loss_through_the_model() -> None:
    net = _model()
    items = _cycles(4, 6)
    torch.manual_seed(1)
    loss = net.loss(items, num_negatives=3)
    assert torch.isfinite(loss) and loss > 0
    # with many negatives the sampled loss approaches the full one in scale (both ~ log of candidates)
    assert net.loss(items, num_negatives=200).item() > math.log(2) * 0.5


@pytest.mark.parametrize("num_negatives", [0, 3])
def test_learns_the_successor_pattern(num_negatives: int) -> None:
    net = _model(dropout=0.1).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(100):
        opt.zero_grad()
        net.loss(_cycles(32, 7, seed=step), num_negatives=num_negatives).backward()
        opt.step()
    net.eval()
    histories = _cycles(64, 6, seed=10_000)
    top = net.recommend(histories, 1)[:, 0]
    hit = (top == (histories[:, -1] + 1) % N_ITEMS).float().mean().item()
    assert hit > 0.9


def _alternating(batch: int, length: int, seed: int) -> Tensor:
    """(B, length) sequences a, b, a, b, ... (a != b random per row), left-padded to >= 3 real items."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(N_ITEMS, (batch, 1), generator=g)
    b = (a + torch.randint(1, N_ITEMS, (batch, 1), generator=g)) % N_ITEMS
    seq = torch.where(torch.arange(length) % 2 == 0, a, b)  # (B, length)
    keep = torch.randint(3, length + 1, (batch, 1), generator=g)
    return seq.masked_fill(torch.arange(length) < length - keep, PAD)


def test_learns_a_pattern_that_needs_attention() -> None:
    # the next item is the one before the last: unreachable from the last item alone
    net = _model(dropout=0.1).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(100):
        opt.zero_grad()
        net.loss(_alternating(32, 7, seed=step)).backward()
        opt.step()
    net.eval()
    histories = _alternating(128, 6, seed=10_000)
    hit = (net.recommend(histories, 1)[:, 0] == histories[:, -2]).float().mean().item()
    assert hit > 0.9
