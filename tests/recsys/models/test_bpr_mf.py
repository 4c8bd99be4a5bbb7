import pytest
import torch

from recsys.losses import bpr_loss, l2_penalty
from recsys.models.bpr_mf import BPRMF


@pytest.mark.parametrize("embedding_dim", [1, 8, 64])
@pytest.mark.parametrize("batch", [1, 5])
def test_contract_shapes_and_consistency(embedding_dim: int, batch: int) -> None:
    torch.manual_seed(0)
    net = BPRMF(num_users=7, num_items=11, embedding_dim=embedding_dim)
    users = torch.randint(7, (batch,))
    items = torch.randint(11, (batch,))
    pair = net(users, items)
    assert pair.shape == (batch,)
    full = net.score_all(users)
    assert full.shape == (batch, 11)
    # forward and score_all agree on the same pairs
    torch.testing.assert_close(full[torch.arange(batch), items], pair)
    top = net.recommend(users, k=4)
    assert top.shape == (batch, 4)
    assert torch.equal(top[:, 0], full.argmax(1))


def test_recommend_masks_and_breaks_ties_by_item_id() -> None:
    net = BPRMF(num_users=1, num_items=5, embedding_dim=1)
    with torch.no_grad():
        net.user_embedding.weight.fill_(1.0)
        net.item_embedding.weight.copy_(torch.tensor([[1.0], [3.0], [1.0], [3.0], [2.0]]))
    users = torch.tensor([0])
    assert net.recommend(users, k=5).tolist() == [[1, 3, 4, 0, 2]]
    exclude = torch.tensor([[False, True, False, False, False]])
    assert net.recommend(users, k=3, exclude=exclude).tolist() == [[3, 4, 0]]


def test_bpr_loss_values_and_gradient_direction() -> None:
    pos = torch.tensor([2.0, 0.0], requires_grad=True)
    neg = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = bpr_loss(pos, neg)
    expected = (-torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (pos.grad < 0).all() and (neg.grad > 0).all()  # descent raises pos, lowers neg


def test_l2_penalty_is_half_squared_norm_per_batch_row() -> None:
    u = torch.ones(4, 3)
    i = torch.full((4, 2, 3), 2.0)
    assert l2_penalty(u, i).item() == pytest.approx((4 * 3 * 1 + 4 * 2 * 3 * 4) / (2 * 4))


def test_training_on_a_planted_preference_learns_it() -> None:
    """Users 0-2 like items 0-2, users 3-5 like items 3-5: BPR must recover the blocks."""
    torch.manual_seed(0)
    net = BPRMF(num_users=6, num_items=6, embedding_dim=4)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    users = torch.arange(6).repeat_interleave(3)
    pos = torch.tensor([0, 1, 2] * 3 + [3, 4, 5] * 3)
    for _ in range(200):
        neg = (pos + 3) % 6
        loss = bpr_loss(net(users, pos), net(users, neg))
        opt.zero_grad()
        loss.backward()
        opt.step()
    top = net.recommend(torch.arange(6), k=3)
    assert all(set(top[u].tolist()) == ({0, 1, 2} if u < 3 else {3, 4, 5}) for u in range(6))


def test_embeddings_give_score_all() -> None:
    """``embeddings()`` hands the evaluator's fused kernel the tables behind ``score_all``."""
    torch.manual_seed(0)
    net = BPRMF(num_users=7, num_items=11, embedding_dim=8)
    user_emb, item_emb = net.embeddings()
    assert user_emb.shape == (7, 8) and item_emb.shape == (11, 8)
    users = torch.tensor([6, 0, 3])
    assert torch.equal(user_emb[users] @ item_emb.T, net.score_all(users))
