"""OneRec: cached generation equals teacher forcing, constrained beams are exact and valid, it learns a
toy next-list rule, DPO's loss, and bad generation requests are refused."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.models.moe import DenseFFN, SparseMoE
from recsys.models.onerec import NEG, OneRec, dpo_loss, ranked_scores
from recsys.semantic_ids import SemanticIds

N_ITEMS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(ffn: str = "moe", list_len: int = 3, seed: int = 0, levels: int = 2, codebook: int = 4) -> OneRec:
    torch.manual_seed(seed)
    ids = SemanticIds.build(
        torch.randn(N_ITEMS, 8), torch.arange(N_ITEMS), levels, codebook, "random", seed=seed
    )
    return OneRec(
        ids.codes,
        ids.vocab_sizes,
        max_len=6,
        list_len=list_len,
        embedding_dim=16,
        num_heads=2,
        ffn=ffn,
        num_experts=4,
        expert_hidden=16,
        dropout=0.0,
    ).eval()


def _histories(n: int = 5, seed: int = 1) -> torch.Tensor:
    h = torch.randint(0, N_ITEMS, (n, 6), generator=torch.Generator().manual_seed(seed))
    h[0, :3] = -1  # a left-padded history
    return h


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_beam_scores_are_the_teacher_forced_list_logprobs(ffn: str) -> None:
    net, h = _net(ffn), _histories()
    lists, scores = net.beam_search(h, net.trie(), list_len=3, width=6)  # cached, one position per step
    assert lists.shape == (5, 6, 3) and scores.shape == (5, 6)
    again = net.list_logprob(h.repeat_interleave(6, 0), lists.view(30, 3)).view(5, 6)  # full decoder pass
    torch.testing.assert_close(scores, again, atol=1e-5, rtol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    for row in lists.view(30, 3).tolist():
        assert len(set(row)) == 3 and all(0 <= i < N_ITEMS for i in row)  # real items, no repeats


def test_one_item_beam_as_wide_as_the_catalogue_is_exact() -> None:
    net, h = _net(list_len=1), _histories()
    lists, scores = net.beam_search(h, net.trie(), list_len=1, width=N_ITEMS)
    every = torch.arange(N_ITEMS).repeat(5, 1)  # (5, N_ITEMS)
    exact = net.list_logprob(h.repeat_interleave(N_ITEMS, 0), every.reshape(-1, 1)).view(5, N_ITEMS)
    best = exact.sort(1, descending=True)
    torch.testing.assert_close(scores, best.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(lists[:, :, 0].sort(1).values, every)  # every item once
    assert (exact.logsumexp(1) < 0).all()  # invalid code paths keep some mass (the softmax is per level)


def test_generation_keeps_to_the_allowed_items() -> None:
    net, h = _net(), _histories()
    allowed = torch.zeros(N_ITEMS, dtype=torch.bool)
    allowed[[1, 4, 7, 9, 15, 20]] = True
    trie = net.trie(allowed)
    lists, _ = net.beam_search(h, trie, 3, 4)
    samples = net.sample(h, trie, 3, num_samples=8, generator=torch.Generator().manual_seed(0))
    for out in (lists, samples):
        assert allowed[out].all()
        assert all(len(set(r)) == 3 for r in out.reshape(-1, 3).tolist())
    with pytest.raises(ValueError, match="6 generable items"):
        net.beam_search(h, trie, 1, 7)
    with pytest.raises(ValueError, match="list_len must be in"):
        net.beam_search(h, net.trie(), 4, 2)


def test_learns_a_toy_next_list_rule() -> None:
    """The next items are always last + 1, + 2, + 3 (mod N_ITEMS): after training, the best beam says so."""
    net = _net(list_len=3).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        h = torch.randint(0, N_ITEMS, (64, 6), generator=g)
        futures = (h[:, -1:] + torch.arange(1, 4)) % N_ITEMS
        out = net.losses(h, futures)
        loss = out["nll"] + 0.01 * out["aux"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    h = torch.randint(0, N_ITEMS, (40, 6), generator=g)
    lists, _ = net.beam_search(h, net.trie(), 3, 4)
    target = (h[:, -1:] + torch.arange(1, 4)) % N_ITEMS
    assert (lists[:, 0] == target).all(1).float().mean() > 0.9
    used = torch.stack([s.tokens_per_expert for s in net.losses(h, target)["routing"]])
    assert (used > 0).all()  # every expert of every block takes tokens


def test_padded_future_items_do_not_count() -> None:
    net, h = _net(), _histories()
    futures = torch.tensor([[3, 5, -1]] * 5)
    assert torch.allclose(net.list_logprob(h, futures), net.list_logprob(h, futures[:, :2]))


def test_dpo_loss() -> None:
    zero = torch.zeros(3)
    assert math.isclose(dpo_loss(zero, zero, zero, zero, 0.1).item(), math.log(2), rel_tol=1e-6)
    chosen = torch.zeros(3, requires_grad=True)
    dpo_loss(chosen, zero, zero, zero, 0.5).backward()
    assert (chosen.grad < 0).all()  # descending the loss raises the chosen list's log-probability
    better = dpo_loss(torch.ones(3), zero, zero, zero, 0.5)
    assert better < math.log(2)


def test_ranked_scores() -> None:
    scores = ranked_scores(torch.tensor([[4, 1, -1]]), 6)
    assert scores[0, 4] > scores[0, 1] > NEG and (scores[0, [0, 2, 3, 5]] == NEG).all()


def test_dense_control_has_the_active_parameters_of_the_moe() -> None:
    moe, dense = _net("moe"), _net("dense")
    assert all(isinstance(b.ffn, SparseMoE) for b in moe.decoder)
    assert all(isinstance(b.ffn, DenseFFN) for b in dense.decoder)
    ffn_moe = sum(b.ffn.active_parameters() - b.ffn.router.weight.numel() for b in moe.decoder)
    ffn_dense = sum(p.numel() for b in dense.decoder for p in b.ffn.parameters())
    assert ffn_moe - ffn_dense == len(moe.decoder) * (2 - 1) * 16  # top-2: one more output bias (d = 16)
    assert sum(p.numel() for p in moe.parameters()) > sum(p.numel() for p in dense.parameters())


def test_bad_arguments() -> None:
    ids = SemanticIds.build(torch.randn(N_ITEMS, 8), torch.arange(N_ITEMS), 2, 4, "random")
    with pytest.raises(ValueError, match="ffn must be"):
        OneRec(ids.codes, ids.vocab_sizes, 6, 3, ffn="sparse")
    with pytest.raises(ValueError, match="outside its position's vocabulary"):
        OneRec(ids.codes + 100, ids.vocab_sizes, 6, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu() -> None:
    net, h = _net(), _histories()
    lists, scores = net.beam_search(h, net.trie(), 3, 6)
    gpu = net.cuda()
    lists_gpu, scores_gpu = gpu.beam_search(h.cuda(), gpu.trie(), 3, 6)
    assert torch.equal(lists_gpu.cpu(), lists)
    torch.testing.assert_close(scores_gpu.cpu(), scores, atol=1e-4, rtol=1e-4)
