import pytest
import torch
from torch_geometric.nn.models import LightGCN as PygLightGCN

from recsys.losses import bpr_loss
from recsys.models.lightgcn import LightGCN, _SymmetricSpmm, normalized_adjacency


def _graph(num_users: int = 30, num_items: int = 40, edges: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(num_users, (edges,), generator=g), torch.randint(num_items, (edges,), generator=g)


@pytest.mark.parametrize("num_layers", [0, 1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_propagation_matches_torch_geometric(num_layers: int, seed: int) -> None:
    U, I = 30, 40  # noqa: E741
    users, items = _graph(U, I, seed=seed)
    torch.manual_seed(seed)
    net = LightGCN(U, I, embedding_dim=8, num_layers=num_layers)
    net.set_graph(users, items)
    keys = torch.unique(users * I + items)
    u, i = keys // I, keys % I + U
    edge_index = torch.stack([torch.cat([u, i]), torch.cat([i, u])])
    ref = PygLightGCN(U + I, 8, num_layers)
    with torch.no_grad():
        ref.embedding.weight.copy_(net.embedding.weight)
    expected = ref.get_embedding(edge_index)
    user_emb, item_emb = net.propagate()
    torch.testing.assert_close(user_emb, expected[:U])
    torch.testing.assert_close(item_emb, expected[U:])


def test_adjacency_is_symmetric_normalised() -> None:
    users, items = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])  # one duplicate edge
    adj = normalized_adjacency(users, items, 2, 2).to_dense()
    torch.testing.assert_close(adj, adj.T)
    # degrees: user0 2, user1 1, item0 1, item1 2 -> weight of (u0, i1) = 1/sqrt(2*2)
    assert adj[0, 3].item() == pytest.approx(0.5)
    assert adj[1, 3].item() == pytest.approx(1 / 2**0.5)
    assert adj[0, 1].item() == 0.0  # no user-user edges


def test_spmm_gradient_is_the_transpose_product() -> None:
    users, items = _graph()
    adj = normalized_adjacency(users, items, 30, 40).to(torch.float64)
    x = torch.randn(70, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _SymmetricSpmm.apply(adj, t), (x,))


@pytest.mark.parametrize("items_shape", [(5,), (5, 3)])
def test_contract_shapes(items_shape: tuple[int, ...]) -> None:
    net = LightGCN(30, 40, embedding_dim=8)
    net.set_graph(*_graph())
    users = torch.arange(5)
    items = torch.randint(40, items_shape)
    assert net(users, items).shape == items_shape
    full = net.score_all(users)
    assert full.shape == (5, 40)
    pairs = net(users, items if items.dim() == 2 else items.unsqueeze(1))  # (5, n)
    torch.testing.assert_close(full.gather(1, items.view(5, -1)), pairs)
    assert net.recommend(users, k=4).shape == (5, 4)


def test_evaluation_cache_never_leaks_into_training() -> None:
    """After a no-grad evaluation pass, training must propagate again with gradients.

    Lightning restores train mode by setting ``module.training`` directly, so the cache must
    not depend on ``train()`` being called.
    """
    net = LightGCN(30, 40, embedding_dim=8)
    net.set_graph(*_graph())
    net.eval()
    with torch.no_grad():
        first = net.score_all(torch.arange(3))
        assert torch.equal(net.score_all(torch.arange(3)), first)  # cached, identical
        assert net.propagate()[1].data_ptr() == net.propagate()[1].data_ptr()  # not recomputed
    net.training = True  # as Lightning's mode restore does
    scores = net(torch.arange(3), torch.tensor([0, 1, 2]))
    assert scores.requires_grad
    scores.sum().backward()
    assert net.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        net.embedding.weight.add_(1.0)  # an optimizer step changes the table in place
        assert not torch.equal(net.score_all(torch.arange(3)), first)  # the cache was dropped


def test_training_learns_a_planted_block_structure() -> None:
    """Users 0-9 interact with items 0-9, users 10-19 with items 10-19 (half of each block)."""
    g = torch.Generator().manual_seed(0)
    users = torch.arange(20).repeat_interleave(5)
    items = (users // 10) * 10 + torch.randint(10, (100,), generator=g)
    torch.manual_seed(0)
    net = LightGCN(20, 20, embedding_dim=8, num_layers=2)
    net.set_graph(users, items)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        neg = (items + 10) % 20
        scores = net(users, torch.stack([items, neg], 1))  # (N, 2)
        loss = bpr_loss(scores[:, 0], scores[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    top = net.recommend(torch.arange(20), k=5)
    assert ((top // 10) == (torch.arange(20) // 10).unsqueeze(1)).all()


def test_missing_graph_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="call set_graph"):
        LightGCN(3, 4).score_all(torch.arange(2))


def test_scoring_works_on_weights_loaded_in_inference_mode() -> None:
    """Lightning's validate/test load checkpoints under ``torch.inference_mode``."""
    net = LightGCN(30, 40, embedding_dim=8)
    net.set_graph(*_graph())
    with torch.inference_mode():
        net.load_state_dict(LightGCN(30, 40, embedding_dim=8).state_dict())
        first = net.score_all(torch.arange(3))
        assert torch.equal(net.score_all(torch.arange(3)), first)


def test_embeddings_give_score_all() -> None:
    """``embeddings()`` hands the evaluator's fused kernel the propagated tables behind ``score_all``."""
    net = LightGCN(30, 40, embedding_dim=8)
    net.set_graph(*_graph())
    with torch.no_grad():
        user_emb, item_emb = net.embeddings()
        users = torch.tensor([29, 0, 7])
        assert user_emb.shape == (30, 8) and item_emb.shape == (40, 8)
        assert torch.equal(user_emb[users] @ item_emb.T, net.score_all(users))
