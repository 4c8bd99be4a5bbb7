"""GraphedStep: a captured training step must train exactly as the eager one does."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys.lit.cuda_graph import GraphedStep, make_capturable
from recsys.lit.pairwise import PairwiseRecommender
from recsys.losses import bpr_loss, l2_penalty
from recsys.models.lightgcn import LightGCN
from retrieval.eval.topk_evaluator import TopKEvaluator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _graph_and_batches(device: str, steps: int, batch: int, last: int):
    """A random bipartite graph (300 users, 200 items) and training triples, with a short last batch."""
    gen = torch.Generator().manual_seed(0)
    users = torch.randint(0, 300, (3000,), generator=gen)
    items = torch.randint(0, 200, (3000,), generator=gen)
    batches = []
    for k in range(steps):
        n = last if k % 4 == 3 else batch  # every 4th batch is the short one, as at an epoch's end
        batches.append(
            (
                torch.randint(0, 300, (n,), generator=gen).to(device),
                torch.randint(0, 200, (n,), generator=gen).to(device),
                torch.randint(0, 200, (n, 1), generator=gen).to(device),
            )
        )
    return users, items, batches


def _lightgcn_loss(net: LightGCN):
    def loss(users, pos, neg):
        items = torch.cat([pos.unsqueeze(1), neg], 1)  # (B, 2)
        scores = net(users, items)  # (B, 2)
        u, i = net.ego_embeddings(users, items)
        return bpr_loss(scores[:, :1].expand_as(scores[:, 1:]), scores[:, 1:]) + 1e-4 * l2_penalty(u, i)

    return loss


def _train(device: str, graphed: bool, steps: int = 16):
    users, items, batches = _graph_and_batches(device, steps, batch=64, last=23)
    torch.manual_seed(0)
    net = LightGCN(300, 200, embedding_dim=16, num_layers=3).to(device)
    net.set_graph(users, items)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    step = GraphedStep(_lightgcn_loss(net), opt, list(net.parameters()))
    losses = []
    for b in batches:
        if graphed:
            losses.append(step(*b).item())
        else:
            opt.zero_grad(set_to_none=True)
            loss = _lightgcn_loss(net)(*b)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return net, opt, step, losses


def test_on_the_cpu_a_graphed_step_is_the_plain_step() -> None:
    net_a, _, step, losses_a = _train("cpu", graphed=True)
    net_b, _, _, losses_b = _train("cpu", graphed=False)
    assert not step._graphs
    assert losses_a == losses_b
    assert torch.equal(net_a.embedding.weight, net_b.embedding.weight)


@cuda
def test_replayed_graphs_train_like_eager_steps() -> None:
    net_g, opt, step, losses_g = _train("cuda", graphed=True)
    net_e, _, _, losses_e = _train("cuda", graphed=False)
    assert len(step._graphs) == 2  # the full batches and the short last one
    assert losses_g == pytest.approx(losses_e, rel=1e-5)
    torch.testing.assert_close(net_g.embedding.weight, net_e.embedding.weight, rtol=1e-5, atol=1e-6)
    assert all(g["capturable"] for g in opt.param_groups)


@cuda
def test_replay_invalidates_the_evaluation_cache() -> None:
    """The graph updates the table behind autograd: LightGCN's cached propagation must not go stale."""
    net, _, step, _ = _train("cuda", graphed=True, steps=12)
    users = torch.arange(300, device="cuda")
    with torch.no_grad():
        before = net.score_all(users)
    _, _, batches = _graph_and_batches("cuda", 1, batch=64, last=23)
    step(*batches[0])  # a replay of the captured full-batch graph
    with torch.no_grad():
        cached = net.score_all(users)
        net._cache = None
        fresh = net.score_all(users)
    assert not torch.equal(before, cached)
    assert torch.equal(cached, fresh)


def test_make_capturable_moves_restored_step_counters_to_the_parameters() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p])
    opt.state[p]["step"] = torch.tensor(5.0)
    make_capturable(opt)
    assert opt.param_groups[0]["capturable"] is True
    assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].item() == 5.0


def test_checkpoints_keep_the_optimizer_portable() -> None:
    """A graphed run's checkpoint must resume on a CPU (capturable Adam refuses CPU tensors)."""
    net = LightGCN(4, 5, embedding_dim=2)
    opt = torch.optim.Adam(net.parameters(), capturable=True)
    ckpt = {"optimizer_states": [opt.state_dict()]}
    module = PairwiseRecommender(net, torch.optim.Adam, TopKEvaluator(), cuda_graph=True)
    module.on_save_checkpoint(ckpt)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["capturable"] is True  # the live optimizer is untouched
    restored = torch.optim.Adam(copy.deepcopy(list(net.parameters())))
    restored.load_state_dict(ckpt["optimizer_states"][0])
    assert restored.param_groups[0]["capturable"] is False


def test_a_scheduler_is_refused_with_cuda_graphs() -> None:
    with pytest.raises(ValueError, match="cuda_graph=true cannot follow a learning-rate scheduler"):
        PairwiseRecommender(
            LightGCN(4, 5, embedding_dim=2),
            torch.optim.Adam,
            TopKEvaluator(),
            scheduler=torch.optim.lr_scheduler.StepLR,
            cuda_graph=True,
        )
