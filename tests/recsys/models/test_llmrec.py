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

    def kept(*args, **kwargs) -> list[float]:
        return sorted(losses[prune_by_loss(losses, *args, **kwargs)].tolist())

    assert prune_by_loss(losses, 0.0).all()
    assert kept(0.2, "drop_high_loss") == sorted(losses.tolist())[:8]
    assert kept(0.1, "drop_high_loss") == sorted(losses.tolist())[:9]  # int(10 · 0.9) = 9, not 8
    assert kept(0.71, "keep_high_loss") == [5.0, 9.0]  # int(10 · 0.29) = 2
    assert prune_by_loss(losses[:1], 0.9).tolist() == [True]  # one sample is always kept
    valid = torch.tensor([True, False, True, True, False, False, True, True, True, True])  # 7 samples
    assert kept(0.3, "drop_high_loss", valid) == pytest.approx([0.1, 0.3, 0.4, 0.5])  # int(7 · 0.7) = 4
    assert kept(0.5, "keep_high_loss", valid) == [1.0, 2.0, 3.0]  # int(7 · 0.5) = 3; 5.0, 9.0 not valid
    assert not prune_by_loss(losses, 0.5, valid=torch.zeros(10, dtype=torch.bool)).any()  # none to keep
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
    users, liked, disliked, valid = module.augmented_pairs(torch.tensor([1, 2, 2, 3]))
    assert users.shape == liked.shape == disliked.shape == valid.shape == (4,)  # fixed shape: A = B
    assert sorted(users.tolist()) == [1, 2, 2, 3]
    rows = zip(users[valid].tolist(), liked[valid].tolist(), disliked[valid].tolist(), strict=True)
    assert sorted(rows) == [(2, 5, 1), (2, 5, 1)]
    assert (liked >= 0).all() and (disliked >= 0).all()  # placeholders stay valid indices
    module = LLMRecRecommender(net, torch.optim.Adam, TopKEvaluator(ks=[5]), augment_rate=0.5)
    module.pairs_of_user = table
    users, _, _, valid = module.augmented_pairs(torch.tensor([0, 0, 0, 0]))
    assert users.tolist() == [0, 0] and valid.all()  # half the batch
    with pytest.raises(ValueError, match="prune_rule"):
        LLMRecRecommender(net, torch.optim.Adam, TopKEvaluator(ks=[5]), prune_rule="median")
    with pytest.raises(TypeError, match="trains an LLMRec net"):
        LLMRecRecommender(LightGCN(4, 6), torch.optim.Adam, TopKEvaluator(ks=[5]))


def _module_with_pairs(prune_rate: float, prune_rule: str = "drop_high_loss") -> LLMRecRecommender:
    users, items = _blocks()
    torch.manual_seed(0)
    net = LLMRec(20, 20, feature_dim=16, embedding_dim=8, feature_weight=0.5, mask_ratio=0.0)
    net.set_graph(users, items)
    net.set_features(_block_features(20), _block_features(20))
    module = LLMRecRecommender(
        net,
        torch.optim.Adam,
        TopKEvaluator(ks=[5]),
        l2_weight=0.1,
        augment_rate=1.0,
        prune_rate=prune_rate,
        prune_rule=prune_rule,
        mae_weight=0.0,
    )
    module.pairs_of_user = pair_table(
        torch.tensor([[u, (u + 3) % 20, (u + 11) % 20] for u in range(0, 20, 3)]), 20
    )
    return module


@pytest.mark.parametrize(
    ("prune_rate", "rule"), [(0.0, "drop_high_loss"), (0.3, "drop_high_loss"), (0.71, "keep_high_loss")]
)
def test_fixed_shape_step_is_the_filtered_one(prune_rate: float, rule: str) -> None:
    """The masked, sync-free step equals the plain one: drop pair-less users, prune, mean, L2."""
    module = _module_with_pairs(prune_rate, rule)
    g = torch.Generator().manual_seed(4)
    batch = {
        "users": torch.randint(20, (32,), generator=g),
        "pos": torch.randint(20, (32,), generator=g),
        "neg": torch.randint(20, (32, 2), generator=g),
    }
    loss = module._loss(batch)

    net, users = module.net, batch["users"]
    has = module.pairs_of_user[users, 0] >= 0
    aug_users = users[has]  # augment_rate 1: every batch user is drawn (order does not matter)
    liked, disliked = module.pairs_of_user[aug_users].unbind(1)
    user_emb, item_emb = net._fused(net.item_features)[0].split([net.num_users, net.num_items])
    items = torch.cat([batch["pos"].unsqueeze(1), batch["neg"]], 1)
    scores = (user_emb[users].unsqueeze(1) * item_emb[items]).sum(-1)
    observed = torch.nn.functional.softplus(scores[:, 1:] - scores[:, :1]).reshape(-1)
    ua = user_emb[aug_users]
    augmented = torch.nn.functional.softplus(
        (ua * item_emb[disliked]).sum(-1) - (ua * item_emb[liked]).sum(-1)
    )
    n_keep = augmented.numel() if prune_rate == 0 else max(1, int(augmented.numel() * (1 - prune_rate)))
    kept = torch.sort(augmented, descending=rule == "keep_high_loss").values[:n_keep]
    rank = torch.cat([observed, kept]).mean()
    ego_u, ego_i = net.ego_embeddings(
        torch.cat([users, aug_users]), torch.cat([items.reshape(-1), liked, disliked])
    )
    expected = rank + 0.1 * (ego_u.pow(2).sum() + ego_i.pow(2).sum()) / (2 * ego_u.shape[0])
    torch.testing.assert_close(loss, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_llmrec_steps_train_like_eager_ones() -> None:
    """With mask_ratio 0 and augment_rate 1 the step is deterministic: graph replays = eager steps."""
    from recsys.lit.cuda_graph import GraphedStep

    results = []
    for graphed in (True, False):
        module = _module_with_pairs(0.3).cuda()
        module.pairs_of_user = module.pairs_of_user.cuda()
        opt = torch.optim.Adam(module.net.parameters(), lr=0.01)
        params = [p for p in module.net.parameters() if p.requires_grad]
        step = GraphedStep(lambda u, p, n, m=module: m._loss({"users": u, "pos": p, "neg": n}), opt, params)
        g = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(8):
            b = [torch.randint(20, s, generator=g).cuda() for s in ((32,), (32,), (32, 2))]
            if graphed:
                losses.append(step(*b).item())
            else:
                loss = module._loss({"users": b[0], "pos": b[1], "neg": b[2]})
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        results.append((losses, module.net.embedding.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
