"""LLMRec: side features fused into LightGCN, masked feature reconstruction, pruned BPR, augmented pairs."""

from __future__ import annotations

import pytest
import torch

from recsys.lit.llmrec import LLMRecRecommender, pair_table
from recsys.losses import bpr_loss, prune_by_loss
from recsys.models.lightgcn import LightGCN
from recsys.models.llmrec import LLMRec, scaled_cosine_error
from retrieval.eval.topk_evaluator import TopKEvaluator


def _blocks(n_users: int = 20, n_items: int = 20, cold: int = 0):
    """Users 0-9 like items 0-9, users 10-19 items 10-19; the last ``cold`` items of each block
    have no training interaction. Returns (users, items) training pairs."""
    g = torch.Generator().manual_seed(0)
    users = torch.arange(n_users).repeat_interleave(6)
    block = users // (n_users // 2)
    per_block = n_items // 2
    items = block * per_block + torch.randint(per_block - cold, (users.numel(),), generator=g)
    return users, items


def _block_features(n: int, dim: int = 16, noise: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(2, dim, generator=g)
    rows = centres[torch.arange(n) // (n // 2)] + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(rows, dim=1)


def test_without_features_it_is_lightgcn() -> None:
    users, items = _blocks()
    torch.manual_seed(0)
    plain = LightGCN(20, 20, embedding_dim=8)
    torch.manual_seed(0)
    net = LLMRec(20, 20, feature_dim=16, embedding_dim=8, feature_weight=0.0)
    for m in (plain, net):
        m.set_graph(users, items)
    net.set_features(_block_features(20), _block_features(20))
    torch.testing.assert_close(net.score_all(torch.arange(20)), plain.score_all(torch.arange(20)))
    u, i, loss = net.training_embeddings()
    assert loss.item() == 0.0 and u.requires_grad


def test_features_change_scores_and_cache_follows_them() -> None:
    users, items = _blocks()
    net = LLMRec(20, 20, feature_dim=16, embedding_dim=8, feature_weight=1.0)
    net.set_graph(users, items)
    net.eval()
    with torch.no_grad():
        before = net.score_all(torch.arange(4))
        net.set_features(_block_features(20), _block_features(20))
        after = net.score_all(torch.arange(4))
    assert not torch.equal(before, after)


def test_side_features_rank_cold_items_for_the_right_users() -> None:
    """Items 7-9 and 17-19 have no training interactions: only their features tell their block.
    After training, users of block 0 rank cold items 7-9 above cold items 17-19 (and vice versa);
    LightGCN alone cannot (its cold items' ID embeddings only ever see negative samples). The side
    weight is large so that the side part outweighs those ID embeddings (at 1 it does not here)."""
    users, items = _blocks(cold=3)
    cold = torch.tensor([7, 8, 9, 17, 18, 19])
    torch.manual_seed(0)
    net = LLMRec(20, 20, feature_dim=16, embedding_dim=8, num_layers=2, feature_weight=5.0, mask_ratio=0.0)
    net.set_graph(users, items)
    net.set_features(_block_features(20), _block_features(20))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(150):
        neg = torch.randint(20, items.shape, generator=g)
        u_emb, i_emb, _ = net.training_embeddings()
        pos_s = (u_emb[users] * i_emb[items]).sum(-1)
        neg_s = (u_emb[users] * i_emb[neg]).sum(-1)
        loss = bpr_loss(pos_s, neg_s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = net.score_all(torch.arange(20))[:, cold]  # (20, 6)
    own = torch.where(torch.arange(20).unsqueeze(1) < 10, scores[:, :3], scores[:, 3:]).mean(1)
    other = torch.where(torch.arange(20).unsqueeze(1) < 10, scores[:, 3:], scores[:, :3]).mean(1)
    assert (own > other).float().mean() >= 0.9


def test_masked_reconstruction_learns_and_trains_the_mask_token() -> None:
    users, items = _blocks()
    torch.manual_seed(0)
    net = LLMRec(20, 20, feature_dim=16, embedding_dim=8, feature_weight=0.5, mask_ratio=0.3)
    net.set_graph(users, items)
    features = _block_features(20, noise=0.05)
    features[19] = 0  # an item whose text fell back: never a reconstruction target
    net.set_features(_block_features(20), features)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(80):
        _, _, loss = net.training_embeddings()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net.mask_token.grad is not None and net.mask_token.abs().sum() > 0
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_set_features_refuses_bad_input() -> None:
    net = LLMRec(5, 6, feature_dim=4, embedding_dim=2)
    with pytest.raises(ValueError, match=r"item features have shape \(5, 4\); expected \(6, 4\)"):
        net.set_features(torch.zeros(5, 4), torch.zeros(5, 4))
    bad = torch.zeros(6, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net.set_features(torch.zeros(5, 4), bad)
    with pytest.raises(ValueError, match="mask_ratio"):
        LLMRec(5, 6, mask_ratio=1.0)


def test_scaled_cosine_error() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert scaled_cosine_error(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert scaled_cosine_error(x, -x).item() == pytest.approx(4.0)  # (1 - (-1))^2
    assert scaled_cosine_error(x[:0], x[:0]).item() == 0.0


def test_prune_by_loss_rules() -> None:
    losses = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2, 9.0, 0.4, 1.0, 0.5, 3.0])
    assert torch.equal(prune_by_loss(losses, 0.0), losses)
    assert sorted(prune_by_loss(losses, 0.2, "drop_high_loss").tolist()) == sorted(losses.tolist())[:8]
    assert sorted(prune_by_loss(losses, 0.71, "keep_high_loss").tolist()) == [5.0, 9.0]  # int(10·0.29) = 2
    assert prune_by_loss(losses[:1], 0.9).tolist() == [pytest.approx(0.1)]  # one sample is always kept
    with pytest.raises(ValueError, match="unknown prune rule"):
        prune_by_loss(losses, 0.1, "median")
    with pytest.raises(ValueError, match="prune_rate"):
        prune_by_loss(losses, 1.0)


def test_augmented_pairs_come_from_the_batch_users() -> None:
    pairs = torch.tensor([[0, 3, 4], [2, 5, 1]])
    table = pair_table(pairs, 4)
    assert table.tolist() == [[3, 4], [-1, -1], [5, 1], [-1, -1]]
    net = LLMRec(4, 6, feature_dim=4, embedding_dim=2)
    module = LLMRecRecommender(net, torch.optim.Adam, TopKEvaluator(ks=[5]), augment_rate=1.0)
    module.pairs_of_user = table
    users, liked, disliked = module.augmented_pairs(torch.tensor([1, 2, 2, 3]))
    assert sorted(zip(users.tolist(), liked.tolist(), disliked.tolist(), strict=True)) == [
        (2, 5, 1),
        (2, 5, 1),
    ]
    module = LLMRecRecommender(net, torch.optim.Adam, TopKEvaluator(ks=[5]), augment_rate=0.5)
    module.pairs_of_user = table
    assert module.augmented_pairs(torch.tensor([0, 0, 0, 0]))[0].tolist() == [0, 0]  # half the batch
    with pytest.raises(ValueError, match="prune_rule"):
        LLMRecRecommender(net, torch.optim.Adam, TopKEvaluator(ks=[5]), prune_rule="median")
    with pytest.raises(TypeError, match="trains an LLMRec net"):
        LLMRecRecommender(LightGCN(4, 6), torch.optim.Adam, TopKEvaluator(ks=[5]))
