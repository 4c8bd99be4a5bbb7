"""Gates of the sparse MoE (top-k, hash, COMET trees), COMET's permutation local search, and OneRec with
each gate."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from recsys.models.gates import CometRouter, HashRouter, leaf_probabilities, local_search, smooth_step
from recsys.models.moe import SparseMoE
from recsys.models.onerec import OneRec
from recsys.semantic_ids import SemanticIds

D, H, E = 8, 8, 4

pytestmark = pytest.mark.usefixtures("one_thread")

GATE_K = [("topk", 1), ("topk", 2), ("hash", 1), ("comet", 1), ("comet", 2), ("comet", 3)]


def _moe(gate: str, k: int, seed: int = 0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    args = dict(dim=D, hidden=H, num_experts=E, top_k=k, gate=gate, num_keys=10, capacity_factor=0.0)
    return SparseMoE(**(args | kw)).double()


def _inputs(n: int = 24, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _mixture(moe: SparseMoE, x: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
    """(T, d) Σ_j g_tj FFN_{e_tj}(x_t), token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(gates.shape[1]):
            if gates[t, j] > 0:
                out[t] += gates[t, j] * moe.experts[int(experts[t, j])](x[t])
    return out


def _comet_brute_force(router: CometRouter, x: Tensor) -> Tensor:
    """(T, E) expert weights g, walking every root-to-leaf path of every tree."""
    k, e = router.top_k, router.num_experts
    s = smooth_step(router.splits(x), router.gamma).view(-1, k, e - 1)  # (T, k, E-1)
    a = router.leaves(x).view(-1, k, e)
    g = torch.zeros(x.shape[0], e, dtype=x.dtype)
    for t in range(x.shape[0]):
        scores = torch.zeros(k, e, dtype=x.dtype)
        for j in range(k):
            for leaf in range(e):
                node, p = e - 1 + leaf, torch.ones((), dtype=x.dtype)
                while node:
                    parent = (node - 1) // 2
                    p = p * (s[t, j, parent] if node % 2 else 1 - s[t, j, parent])  # odd node: left child
                    node = parent
                scores[j, leaf] = p * a[t, j, leaf].exp()
        omega = scores / scores.sum()
        for j in range(k):
            for leaf in range(e):
                g[t, router.leaf_expert[j, leaf]] += omega[j, leaf]
    return g


@pytest.mark.parametrize(("gate", "k"), GATE_K)
def test_shapes_cardinality_and_mixture(gate: str, k: int) -> None:
    moe, (x, keys) = _moe(gate, k), _inputs()
    with torch.no_grad():
        routing = moe.router.route(x, keys, torch.float64)
        y, stats = moe(x, keys=keys)
    assert routing.gates.shape == routing.experts.shape == routing.active.shape == (24, k)
    assert ((routing.gates > 0) == routing.active).all() and (routing.active.sum(1) <= k).all()
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(24, dtype=torch.float64))
    for row, act in zip(routing.experts.tolist(), routing.active.tolist(), strict=True):  # distinct experts
        chosen = [e for e, a in zip(row, act, strict=True) if a]
        assert len(set(chosen)) == len(chosen) and all(0 <= e < E for e in chosen)
    torch.testing.assert_close(y, _mixture(moe, x, routing.gates, routing.experts), atol=1e-10, rtol=0)
    assert stats.assignments.item() == routing.active.sum().item() and stats.dropped.item() == 0
    assert stats.tokens_per_expert.shape == (E,) and stats.tokens_per_expert.sum() == stats.assignments


@pytest.mark.parametrize(("gate", "k"), GATE_K)
def test_capacity_and_padding(gate: str, k: int) -> None:
    moe = _moe(gate, k, capacity_factor=0.5).train()
    x, keys = torch.randn(3, 8, D, dtype=torch.float64), torch.randint(0, 10, (3, 8))
    mask = torch.rand(3, 8) < 0.7
    y, stats = moe(x, mask, keys)
    assert (y[~mask] == 0).all()
    assert stats.tokens_per_expert.sum() + stats.dropped == stats.assignments
    assert stats.dropped > 0  # half the balanced load: something is dropped
    alone, alone_stats = moe(x[mask], keys=keys[mask])
    torch.testing.assert_close(y[mask], alone)
    torch.testing.assert_close(stats.tokens_per_expert, alone_stats.tokens_per_expert)


@pytest.mark.parametrize(("gate", "k"), [("hash", 1), ("comet", 2)])
def test_all_padding(gate: str, k: int) -> None:
    moe = _moe(gate, k, capacity_factor=1.0).train()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    y, stats = moe(torch.randn(2, 3, D, dtype=torch.float64), mask, torch.zeros(2, 3, dtype=torch.int64))
    assert (y == 0).all() and stats.assignments.item() == 0 and stats.tokens_per_expert.sum() == 0
    assert stats.aux_loss.item() == 0 and stats.truncated.item() == 0 and stats.gate_entropy.item() == 0


def test_topk_unchanged_and_state_dict_keys() -> None:
    """The default gate is the softmax top-k router under the old state-dict key ``router.weight``."""
    torch.manual_seed(0)
    moe = SparseMoE(D, H, E, top_k=2)
    assert [k for k in moe.state_dict() if k.startswith("router")] == ["router.weight"]
    x = torch.randn(5, D)
    probs = moe.router(x).softmax(-1)
    routing = moe.router.route(x, None, torch.float32)
    top = probs.topk(2).values  # (5, 2)
    torch.testing.assert_close(routing.gates, top / top.sum(1, keepdim=True))
    assert routing.truncated.item() == 0 and routing.entropy.item() == 0


def test_hash_map_is_seeded_balanced_and_saved() -> None:
    a, b, c = HashRouter(E, 103, seed=3), HashRouter(E, 103, seed=3), HashRouter(E, 103, seed=4)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    counts = torch.bincount(a.table, minlength=E)
    assert counts.max() - counts.min() <= 1  # balanced: 25 or 26 keys each
    moe = SparseMoE(D, H, E, top_k=1, gate="hash", num_keys=103, seed=3)
    assert "router.table" in moe.state_dict() and not list(moe.router.parameters())
    other = SparseMoE(D, H, E, top_k=1, gate="hash", num_keys=103, seed=9)
    x, keys = torch.randn(6, D), torch.tensor([0, 5, 5, 102, 103, -1])
    other.load_state_dict(moe.state_dict())
    torch.testing.assert_close(other(x, keys=keys)[0], moe(x, keys=keys)[0], atol=0, rtol=0)
    experts = moe.router.route(x, keys, torch.float32).experts[:, 0]
    assert experts[1] == experts[2] and experts[0] == experts[4] and experts[3] == experts[5]  # keys mod 103
    _, stats = moe(x, keys=keys)
    assert stats.aux_loss.item() == 0 and stats.z_loss.item() == 0
    with pytest.raises(ValueError, match="keys"):
        moe(x)
    with pytest.raises(ValueError, match="top_k must be 1"):
        SparseMoE(D, H, E, top_k=2, gate="hash", num_keys=10)
    with pytest.raises(ValueError, match="num_keys"):
        SparseMoE(D, H, E, top_k=1, gate="hash")


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step(gamma: float) -> None:
    outside = torch.tensor([gamma / 2, gamma / 2 + 1e-3, gamma, 1e3], dtype=torch.float64)
    assert (smooth_step(outside, gamma) == 1).all() and (smooth_step(-outside, gamma) == 0).all()
    assert smooth_step(torch.zeros(1), gamma).item() == 0.5
    t = torch.linspace(-gamma, gamma, 401, dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    assert (s.diff() >= 0).all() and (s >= 0).all() and (s <= 1).all()
    (grad,) = torch.autograd.grad(s.sum(), t)
    inside = t.abs() < gamma / 2
    assert (grad[~inside] == 0).all() and (grad[inside][1:-1] > 0).all()
    near = torch.tensor([gamma / 2 - 1e-6], dtype=torch.float64)  # continuous at the band's edge
    assert smooth_step(near, gamma).item() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="gamma"):
        smooth_step(t, 0.0)


@pytest.mark.parametrize("num_experts", [2, 3, 4, 5, 8])
def test_leaf_probabilities_sum_to_one(num_experts: int) -> None:
    s = torch.rand(7, 2, num_experts - 1, dtype=torch.float64)
    p = leaf_probabilities(s)
    assert p.shape == (7, 2, num_experts)
    torch.testing.assert_close(p.sum(-1), torch.ones(7, 2, dtype=torch.float64))
    hard = leaf_probabilities((s > 0.5).double())
    assert ((hard == 0) | (hard == 1)).all() and (hard.sum(-1) == 1).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_comet_matches_its_formula(k: int) -> None:
    moe, (x, _) = _moe("comet", k, seed=2), _inputs(6)
    with torch.no_grad():
        moe.router.splits.weight.normal_(0, 0.5)  # some splits hard, some soft
        moe.router.leaves.weight.normal_(0, 0.5)
        moe.router.leaf_expert[0] = torch.tensor([2, 0, 3, 1])
        g, _ = moe.router.expert_weights(x, torch.float64)
        expected = _comet_brute_force(moe.router, x)
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=0)


def test_comet_soft_at_start_hard_beyond_the_band() -> None:
    moe, (x, _) = _moe("comet", 2, seed=0), _inputs()
    with torch.no_grad():
        soft = moe.router.route(x, None, torch.float64)
    assert soft.truncated.item() == 24  # fresh trees: S ≈ 1/2, every leaf has mass, cut to the top 2
    assert soft.entropy.item() == pytest.approx(math.log(E), rel=1e-2)
    with torch.no_grad():
        w = moe.router.splits.weight
        w.copy_(torch.randn_like(w))
        w.mul_(moe.router.gamma / (w @ x.T).abs().min())  # every split input at least γ, beyond γ/2
        p = moe.router.leaf_distribution(x, torch.float64)  # (T, k, E)
        hard = moe.router.route(x, None, torch.float64)
    assert ((p == 0) | (p == 1)).all() and (p.sum(-1) == 1).all()  # one leaf per tree
    assert hard.truncated.item() == 0 and hard.entropy.item() == 0
    assert ((hard.probs > 0).sum(1) <= 2).all()  # cardinality k without truncation


def test_comet_gradients_flow_and_stop_when_hard() -> None:
    moe, (x, _) = _moe("comet", 2, seed=0), _inputs()
    moe.train()
    y, stats = moe(x)
    (y.square().sum() + stats.aux_loss).backward()
    router = moe.router
    assert router.splits.weight.grad.abs().sum() > 0 and router.leaves.weight.grad.abs().sum() > 0
    assert router.leaves.bias.grad.abs().sum() > 0
    with torch.no_grad():
        w = router.splits.weight
        w.mul_(router.gamma / (w @ x.T).abs().min())  # every split input beyond γ/2: conditional
    router.zero_grad()
    y, stats = moe(x)
    (y.square().sum() + stats.aux_loss).backward()
    assert (router.splits.weight.grad == 0).all() and router.leaves.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("gate", "k"), [("topk", 2), ("hash", 1), ("comet", 2)])
def test_a_swap_changes_routing_and_undoes(gate: str, k: int) -> None:
    moe, (x, keys) = _moe(gate, k), _inputs()
    with torch.no_grad():
        before = moe(x, keys=keys)[0]
        used = moe.router.route(x, keys, torch.float64).experts[:, 0]
        a, b = used[0].item(), next(e for e in range(E) if e != used[0].item())
        moe.router.swap(0, a, b)
        swapped = moe(x, keys=keys)[0]
        moe.router.swap(0, a, b)
        again = moe(x, keys=keys)[0]
    assert not torch.allclose(swapped, before)
    torch.testing.assert_close(again, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="group"):
        moe.router.swap(k if gate == "comet" else 1, 0, 1)


def _clusters(n: int = 96, k: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """(n, D) inputs around k centres, targets y = A_c x (a map per cluster), (n,) cluster ids."""
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(k, D, generator=g, dtype=torch.float64)
    maps = torch.randn(k, D, D, generator=g, dtype=torch.float64) / D**0.5
    cluster = torch.arange(n) % k
    x = centres[cluster] + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, torch.einsum("nij,nj->ni", maps[cluster], x), cluster


def _assignment(moe: SparseMoE) -> Tensor:
    router = moe.router
    if moe.gate == "topk":
        return router.weight.detach().clone()
    return (router.table if moe.gate == "hash" else router.leaf_expert).clone()


@pytest.mark.parametrize(("gate", "k"), [("topk", 1), ("hash", 1), ("comet", 1), ("comet", 2)])
def test_local_search_repairs_a_scrambled_assignment(gate: str, k: int) -> None:
    x, target, cluster = _clusters()
    moe = _moe(gate, k, seed=0, num_keys=4)
    opt = torch.optim.Adam(moe.parameters(), lr=2e-2)
    for _ in range(60):  # experts specialise on the clusters their slots receive
        y, stats = moe(x, keys=cluster)
        opt.zero_grad()
        ((y - target).square().mean() + 0.01 * stats.aux_loss).backward()
        opt.step()
    moe.eval()

    def loss() -> Tensor:
        return (moe(x, keys=cluster)[0] - target).square().mean()

    with torch.no_grad():
        trained = loss().item()
        for j in range(moe.router.groups):  # scramble: the cycle 0 -> 1 -> 2 -> 3 -> 0 in every group
            for a in range(E - 1):
                moe.router.swap(j, a, a + 1)
        scrambled = loss().item()
    assert scrambled > 1.5 * trained
    start, reference = _assignment(moe), copy.deepcopy(moe)
    out = local_search(moe, loss, max_moves=200, seed=0)
    assert out["loss_before"] == scrambled and out["loss_after"] < scrambled
    assert out["loss_after"] < 0.5 * scrambled and out["moves_accepted"] >= 1 and out["converged"]
    assert out["loss_after"] == loss().item()  # the module is left in the best assignment found
    perm = out["permutation"]  # perm[j, s]: the expert slot s of group j now feeds
    assert (perm.sort(1).values == torch.arange(E)).all()
    after = _assignment(moe)
    if gate == "topk":  # router row s now sits at row perm[s]
        torch.testing.assert_close(after[perm[0]], start, atol=0, rtol=0)
    elif gate == "hash":
        assert torch.equal(after, perm[0][start])
    else:
        assert torch.equal(after, perm.gather(1, start))
    if moe.router.groups == 1:  # same function as the scrambled model with its experts relabelled
        reference.experts = torch.nn.ModuleList(reference.experts[int(perm[0][s])] for s in range(E))
        with torch.no_grad():
            torch.testing.assert_close(moe(x, keys=cluster)[0], reference(x, keys=cluster)[0], atol=0, rtol=0)


def test_local_search_budget_and_bad_arguments() -> None:
    moe, (x, _) = _moe("topk", 2), _inputs()
    weight = moe.router.weight.detach().clone()
    calls = []

    def loss() -> Tensor:
        calls.append(1)
        return moe(x)[0].sum()

    out = local_search(moe, loss, max_moves=0)
    assert out["moves_tried"] == 0 and len(calls) == 1 and not out["converged"]
    assert torch.equal(moe.router.weight, weight) and out["loss_after"] == out["loss_before"]
    out = local_search(moe, loss, max_moves=3, seed=1)
    assert out["moves_tried"] == 3 and len(calls) == 5
    with pytest.raises(ValueError, match="max_moves"):
        local_search(moe, loss, max_moves=-1)
    with pytest.raises(TypeError, match="SparseMoE"):
        local_search(torch.nn.Linear(2, 2), loss, max_moves=1)
    with pytest.raises(ValueError, match="gate must be one of"):
        SparseMoE(D, H, E, gate="dselect")


N_ITEMS = 24


def _onerec(gate: str, top_k: int) -> OneRec:
    torch.manual_seed(0)
    ids = SemanticIds.build(torch.randn(N_ITEMS, 8), torch.arange(N_ITEMS), 2, 4, "random", seed=0)
    return OneRec(
        ids.codes, ids.vocab_sizes, max_len=6, list_len=2, embedding_dim=16, num_heads=2, num_experts=4,
        top_k=top_k, expert_hidden=16, dropout=0.0, gate=gate,
    )  # fmt: skip


@pytest.mark.parametrize(("gate", "k"), [("topk", 2), ("hash", 1), ("comet", 2)])
def test_onerec_trains_and_generates_with_each_gate(gate: str, k: int) -> None:
    net = _onerec(gate, k)
    assert all(isinstance(b.ffn, SparseMoE) and b.ffn.gate == gate for b in net.decoder)
    h = torch.randint(0, N_ITEMS, (3, 6), generator=torch.Generator().manual_seed(1))
    h[0, :2] = -1
    futures = torch.randint(0, N_ITEMS, (3, 2), generator=torch.Generator().manual_seed(2))
    out = net.train().losses(h, futures)
    (out["nll"] + 0.01 * out["aux"] + 0.001 * out["z"]).backward()
    assert torch.isfinite(out["nll"]) and len(out["routing"]) == 2
    assert all(s.tokens_per_expert.sum() + s.dropped == s.assignments for s in out["routing"])
    assert (out["aux"].item() == 0) == (gate == "hash")
    lists, scores = net.eval().beam_search(h, net.trie(), list_len=2, width=3)  # cached: one position a step
    again = net.list_logprob(h.repeat_interleave(3, 0), lists.view(9, 2)).view(3, 3)  # full decoder pass
    torch.testing.assert_close(scores, again, atol=1e-5, rtol=1e-5)  # the cached step routes the same keys
    assert all(len(set(r)) == 2 for r in lists.view(9, 2).tolist())


def test_onerec_hash_blocks_have_their_own_maps() -> None:
    net = _onerec("hash", 1)
    tables = [b.ffn.router.table for b in net.decoder]
    assert tables[0].numel() == net.bos + 1 and not torch.equal(tables[0], tables[1])


def test_config_gate_and_bad_values() -> None:
    cfg = OmegaConf.load("conf/model/onerec.yaml").net
    assert cfg.gate == "topk"
    ids = SemanticIds.build(torch.randn(N_ITEMS, 8), torch.arange(N_ITEMS), 2, 4, "random", seed=0)
    make = instantiate(cfg)
    net = make(codes=ids.codes, vocab_sizes=ids.vocab_sizes, max_len=6, list_len=2)
    assert all(b.ffn.gate == "topk" for b in net.decoder)
    with pytest.raises(ValueError, match="gate .model.net.gate. must be one of"):
        instantiate(cfg, gate="moe")(codes=ids.codes, vocab_sizes=ids.vocab_sizes, max_len=6, list_len=2)
    with pytest.raises(ValueError, match="top_k=1"):
        instantiate(cfg, gate="hash")(codes=ids.codes, vocab_sizes=ids.vocab_sizes, max_len=6, list_len=2)
