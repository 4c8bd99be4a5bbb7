import math

import pytest
import torch
from torch import Tensor, nn

from recsys.models.moe import (
    DenseFFN,
    FeedForward,
    RoutingStats,
    SparseMoE,
    dense_hidden_for,
    expert_capacity,
    expert_utilisation,
    positions_in_experts,
    starved_experts,
)

D, H, E = 6, 5, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _moe(seed: int = 0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    return SparseMoE(**(dict(dim=D, hidden=H, num_experts=E) | kw)).train()  # no dropout, no jitter: exact


def _brute_force(moe: SparseMoE, x: Tensor) -> Tensor:
    """(T, d) -> (T, d): per token, sum over its top-k experts of renormalised gate × expert(x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.router(x[t]), dim=-1)  # (E,)
        top = sorted(range(moe.num_experts), key=lambda e: -probs[e].item())[: moe.top_k]
        total = sum(probs[e] for e in top)
        for e in top:
            out[t] += probs[e] / total * moe.experts[e](x[t])
    return out


def _steer(moe: SparseMoE, first: Tensor) -> Tensor:
    """Set the router so a token whose feature 1 is +1 picks experts (1, 0) and -1 picks (0, 1).

    Feature 0 is 1 everywhere; logits are 2 - s for expert 0, 2 + s for expert 1 and 0 for the rest, with
    s = feature 1. Returns the (T, d) inputs, T = len(first), ``first`` (T,) the sign s per token.
    """
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, :2] = torch.tensor([2.0, -1.0])
        moe.router.weight[1, :2] = torch.tensor([2.0, 1.0])
    x = torch.randn(first.numel(), moe.dim)
    x[:, 0], x[:, 1] = 1.0, first
    return x


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(7,), (2, 5)])
def test_matches_brute_force_without_capacity(top_k: int, shape: tuple[int, ...]) -> None:
    moe = _moe(top_k=top_k, capacity_factor=0.0).double()
    with torch.no_grad():
        moe.router.weight.mul_(5.0)  # spread the logits: no near-ties in the top-k
    x = torch.randn(*shape, D, dtype=torch.float64)
    y, stats = moe(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    expected = _brute_force(moe, x.reshape(-1, D)).view(x.shape)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)
    n = math.prod(shape)
    assert stats.dropped.item() == 0 and stats.assignments.item() == n * top_k
    assert stats.tokens_per_expert.shape == (E,) and stats.tokens_per_expert.sum().item() == n * top_k


def test_capacity_drops_past_capacity_first_choices_first() -> None:
    """Tokens 0-3 choose (1, 0), tokens 4-7 choose (0, 1); C = ceil(0.5 · 8 · 2 / 4) = 2 per expert."""
    moe = _moe(top_k=2, capacity_factor=0.5).double()
    x = _steer(moe, torch.tensor([1.0] * 4 + [-1.0] * 4)).double()
    y, stats = moe(x)
    # Expert 0 keeps its first choices from tokens 4, 5 over the earlier second choices of tokens 0-3;
    # expert 1 likewise keeps tokens 0, 1. 16 assignments, 4 kept.
    assert stats.tokens_per_expert.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert stats.dropped.item() == 12 and stats.assignments.item() == 16
    probs = torch.softmax(moe.router(x), dim=-1)  # (8, E)
    with torch.no_grad():
        for t, e in [(0, 1), (1, 1), (4, 0), (5, 0)]:
            gate = probs[t, e] / (probs[t, 0] + probs[t, 1])
            torch.testing.assert_close(y[t], gate * moe.experts[e](x[t]), atol=1e-12, rtol=0)
    assert (y[[2, 3, 6, 7]] == 0).all()


def test_capacity_all_to_one_expert() -> None:
    """Every token's first choice is expert 0 (k = 1); only the first C = ceil(1.0 · 10 / 4) = 3 are kept."""
    moe = _moe(top_k=1, capacity_factor=1.0)
    x = _steer(moe, -torch.ones(10))
    y, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [3.0, 0.0, 0.0, 0.0] and stats.dropped.item() == 7
    with torch.no_grad():
        torch.testing.assert_close(y[:3], moe.experts[0](x[:3]))  # k = 1: gate 1
    assert (y[3:] == 0).all()


def test_inference_drops_nothing() -> None:
    """Capacity is a training device: in eval mode the same crowded batch keeps every assignment."""
    moe = _moe(top_k=1, capacity_factor=1.0).eval()
    x = _steer(moe, -torch.ones(10))
    y, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [10.0, 0.0, 0.0, 0.0] and stats.dropped.item() == 0
    with torch.no_grad():
        torch.testing.assert_close(y, moe.experts[0](x))


def test_capacity_and_positions() -> None:
    assert expert_capacity(8, 2, 4, 1.25) == 5
    assert expert_capacity(10, 1, 1, 1.1) == 11  # 1.1 * 10 = 11.000000000000002 adds no slot
    assert expert_capacity(9, 2, 4, 0.0) == 9
    experts = torch.tensor([[1, 0], [0, 1], [1, 2]])  # (T=3, k=2)
    # queue order: first choices of tokens 0, 1, 2, then second choices of tokens 0, 1, 2
    assert positions_in_experts(experts, 3).tolist() == [[0, 1], [0, 2], [1, 0]]


def test_aux_loss_uniform_router_is_one() -> None:
    moe = _moe(top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, stats = moe(torch.randn(3, 8, D))
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert stats.z_loss.item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_aux_and_z_loss_match_formula_and_train_the_router() -> None:
    moe = _moe(top_k=2).double()
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # skew the routing towards expert 0 for inputs around +1
    x = torch.randn(20, D, dtype=torch.float64) + 1.0
    _, stats = moe(x)
    logits = moe.router(x).detach()  # (T, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(2, dim=-1).indices  # (T, 2)
    f = torch.stack([(chosen == e).sum().double() / chosen.numel() for e in range(E)])
    expected = E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(stats.aux_loss.detach(), expected, atol=1e-12, rtol=0)
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    torch.testing.assert_close(stats.z_loss.detach(), z, atol=1e-12, rtol=0)
    assert expected.item() > 1.5  # skewed routing, well above the uniform minimum 1
    stats.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        moe(x)[1].aux_loss.backward()
        opt.step()
    assert moe(x)[1].aux_loss.item() < 1.1  # gradient steps on the aux loss alone balance the routing


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_padding_is_not_routed(capacity_factor: float) -> None:
    moe = _moe(top_k=2, capacity_factor=capacity_factor)
    x = torch.randn(3, 6, D)
    mask = torch.rand(3, 6) < 0.6
    mask[0, 0], mask[1, 1] = True, False
    y, stats = moe(x, mask)
    real = int(mask.sum())
    assert (y[~mask] == 0).all()
    assert stats.assignments.item() == 2 * real
    assert stats.tokens_per_expert.sum().item() + stats.dropped.item() == 2 * real
    alone, alone_stats = moe(x[mask])  # the real tokens only: same outputs, same capacity
    torch.testing.assert_close(y[mask], alone)
    torch.testing.assert_close(stats.tokens_per_expert, alone_stats.tokens_per_expert)
    x2 = x.clone()
    x2[~mask] = 1e3 * torch.randn(int((~mask).sum()), D)
    y2, stats2 = moe(x2, mask)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    torch.testing.assert_close(stats2.aux_loss, stats.aux_loss, atol=0, rtol=0)


def test_all_padding() -> None:
    moe = _moe()
    y, stats = moe(torch.randn(2, 3, D), torch.zeros(2, 3, dtype=torch.bool))
    assert (y == 0).all() and stats.assignments.item() == 0 and stats.tokens_per_expert.sum() == 0
    assert stats.aux_loss.item() == 0 and stats.z_loss.item() == 0


def test_router_jitter_in_training_only() -> None:
    moe = _moe(router_jitter=0.3).eval()
    x = torch.randn(16, D)
    torch.testing.assert_close(moe(x)[0], moe(x)[0], atol=0, rtol=0)  # eval: no noise
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])
    still = _moe(router_jitter=0.0).train()
    torch.testing.assert_close(still(x)[0], still(x)[0], atol=0, rtol=0)


def test_bfloat16() -> None:
    moe = _moe(top_k=2, capacity_factor=0.0)
    x = torch.randn(4, 5, D)
    reference, _ = moe(x)
    y, stats = moe.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and stats.aux_loss.dtype == torch.float32
    assert (y.float() - reference).abs().max() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    moe = _moe(top_k=2, capacity_factor=1.0)
    x, mask = torch.randn(4, 9, D), torch.rand(4, 9) < 0.8
    y, stats = moe(x, mask)
    y_gpu, stats_gpu = moe.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats_gpu.tokens_per_expert.cpu(), stats.tokens_per_expert)


class _Residual(nn.Module):
    """Two routed feed-forward blocks with residual connections."""

    def __init__(self, make: type[nn.Module], **kw):
        super().__init__()
        self.blocks = nn.ModuleList([make(**kw), make(**kw)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        aux, counts = x.new_zeros(()), []
        for block in self.blocks:
            h, stats = block(x)
            x, aux = x + h, aux + stats.aux_loss
            counts.append(stats.tokens_per_expert)
        return x, aux, counts


def _clusters(n: int = 128, dim: int = 8, k: int = 4) -> tuple[Tensor, Tensor]:
    """(n, dim) inputs around k centres and targets y = A_c x, a different linear map A_c per cluster."""
    g = torch.Generator().manual_seed(0)
    centres, maps = 3 * torch.randn(k, dim, generator=g), torch.randn(k, dim, dim, generator=g) / dim**0.5
    cluster = torch.randint(k, (n,), generator=g)
    x = centres[cluster] + 0.5 * torch.randn(n, dim, generator=g)
    return x, torch.einsum("nij,nj->ni", maps[cluster], x)


def _fit(net: _Residual, x: Tensor, y: Tensor, aux_weight: float, steps: int = 100) -> tuple[float, float]:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(steps):
        out, aux, _ = net(x)
        loss = (out - y).square().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        (loss + aux_weight * aux).backward()
        opt.step()
    with torch.no_grad():
        return first, (net(x)[0] - y).square().mean().item()


def test_training_reduces_loss_without_starving_experts() -> None:
    x, y = _clusters()
    torch.manual_seed(0)
    moe = _Residual(SparseMoE, dim=8, hidden=8, num_experts=4, top_k=1, capacity_factor=0.0)
    first, last = _fit(moe, x, y, aux_weight=0.01)
    assert last < 0.05 * first
    with torch.no_grad():
        counts = moe(x)[2]
    assert [starved_experts(c) for c in counts] == [0, 0]
    torch.manual_seed(0)
    dense = _Residual(DenseFFN, dim=8, hidden=dense_hidden_for(8, 8, 1))
    dense_first, dense_last = _fit(dense, x, y, aux_weight=0.0)
    assert dense_last < 0.05 * dense_first  # the control learns too: same signature, same recipe


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dense_control_at_equal_active_parameters(top_k: int) -> None:
    moe = SparseMoE(D, H, E, top_k=top_k)
    dense = DenseFFN(D, dense_hidden_for(D, H, top_k))
    ffn = moe.active_parameters() - moe.router.weight.numel()
    assert moe.router.weight.numel() == D * E
    assert ffn == top_k * sum(p.numel() for p in FeedForward(D, H).parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    # equal weight matrices and hidden biases; the k experts carry k output biases, the dense FFN one
    assert ffn == dense_params + (top_k - 1) * D


def test_dense_ffn_signature_and_padding() -> None:
    torch.manual_seed(0)
    dense = DenseFFN(D, 7)
    x, mask = torch.randn(2, 5, D), torch.rand(2, 5) < 0.5
    y, stats = dense(x, mask)
    assert isinstance(stats, RoutingStats) and y.shape == x.shape
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], dense.ffn(x[mask]))
    assert stats.tokens_per_expert.shape == (1,) and stats.tokens_per_expert.item() == mask.sum()
    assert stats.aux_loss.item() == 0 and stats.z_loss.item() == 0 and stats.dropped.item() == 0
    torch.testing.assert_close(dense(x)[0], dense.ffn(x))


def test_utilisation_and_starvation() -> None:
    counts = torch.tensor([10.0, 10.0, 0.5, 0.0])
    torch.testing.assert_close(expert_utilisation(counts), counts / 20.5)
    assert starved_experts(counts) == 2  # 0.5 / 20.5 < 0.1 / 4
    assert starved_experts(counts, threshold=0.05) == 1
    assert starved_experts(torch.full((4,), 3.0)) == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=1),
        dict(top_k=0),
        dict(top_k=E + 1),
        dict(hidden=0),
        dict(dim=0),
        dict(router_jitter=1.0),
        dict(router_jitter=-0.1),
    ],
)
def test_bad_arguments(kw: dict) -> None:
    with pytest.raises(ValueError):
        SparseMoE(**(dict(dim=D, hidden=H, num_experts=E) | kw))


def test_bad_inputs() -> None:
    moe = _moe()
    with pytest.raises(ValueError, match="width"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="mask shape"):
        moe(torch.randn(2, 3, D), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        FeedForward(D, 0)
    with pytest.raises(ValueError):
        dense_hidden_for(D, H, 0)
