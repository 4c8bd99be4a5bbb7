"""DSL: allocation, the cosine schedule, drop/grow choices, the budget, checkpoints, configs, export."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from recsys.dsl import DynamicSparsity, allocate, cosine_fraction, prune_by_magnitude
from recsys.dsl_export import SparseDotScorer, SparseEmbeddingTables, export_sparse, load_sparse_into
from recsys.lit.pairwise import SPARSE_EXPORT, PairwiseRecommender
from recsys.models.bpr_mf import BPRMF
from recsys.models.lightgcn import LightGCN
from recsys.train import check_sparsity_config
from retrieval.cli import ConfigError
from retrieval.eval.topk_evaluator import TopKEvaluator
from retrieval.types import ItemSets
from tests.recsys.helpers import compose_config

U, N = 30, 40


class _OneTable(nn.Module):
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.table = nn.Embedding(rows, cols)


class _TinyData(L.LightningDataModule):
    """Random interactions; 5 training batches of 24 (user, positive, negative) triples per epoch."""

    batch_kind = "pairwise"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.users, self.items = (
            torch.randint(0, U, (200,), generator=g),
            torch.randint(0, N, (200,), generator=g),
        )
        self.neg = torch.randint(0, N, (200, 1), generator=g)
        self.sets = (
            ItemSets.from_pairs(self.users[150:], self.items[150:], U, N),
            ItemSets.from_pairs(self.users[:150], self.items[:150], U, N),
        )

    def train_pairs(self):
        return self.users, self.items

    def train_dataloader(self) -> DataLoader:
        batches = [
            {"users": self.users[i : i + 24], "pos": self.items[i : i + 24], "neg": self.neg[i : i + 24]}
            for i in range(0, 120, 24)
        ]
        return DataLoader(batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{"users": u} for u in torch.arange(U).split(16)], batch_size=None)

    def targets(self, stage: str, protocol: str = "") -> ItemSets:
        return self.sets[0]

    def exclude(self, stage: str, protocol: str = "") -> ItemSets:
        return self.sets[1]


def _module(net: nn.Module, cuda_graph: bool = False, **sparsity) -> PairwiseRecommender:
    sp = DynamicSparsity(**({"density": 0.25, "update_interval": 2, "stop_fraction": 1.0} | sparsity))
    opt = lambda params: torch.optim.Adam(params, lr=0.05)  # noqa: E731
    return PairwiseRecommender(net, opt, TopKEvaluator(ks=(5,)), sparsity=sp, cuda_graph=cuda_graph)


def _trainer(root: Path, epochs: int = 3, accelerator: str = "cpu") -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", monitor=None, save_last=True)
    return L.Trainer(
        accelerator=accelerator,
        max_epochs=epochs,
        default_root_dir=root,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


# --- allocation and schedule -------------------------------------------------------------------


def test_uniform_allocation_keeps_each_table_at_the_density_and_sums_to_the_budget():
    assert allocate({"a": (10, 8), "b": (50, 8)}, 0.25) == {"a": 20, "b": 100}
    counts = allocate({"a": (3, 3), "b": (3, 3)}, 0.5)  # 4.5 each: one rounds up, total stays 9
    assert sorted(counts.values()) == [4, 5] and sum(counts.values()) == round(0.5 * 18)


def test_erdos_renyi_allocation_is_proportional_to_rows_plus_cols():
    counts = allocate({"big": (100, 4), "small": (10, 4)}, 0.5, "erdos_renyi")
    eps = 220 / (104 + 14)  # budget / sum(r + c)
    assert counts == {"big": round(eps * 104), "small": round(eps * 14)} == {"big": 194, "small": 26}


def test_erdos_renyi_caps_a_table_at_density_one_and_rescales_the_rest():
    counts = allocate({"big": (1000, 4), "tiny": (2, 4)}, 0.5, "erdos_renyi")
    assert counts == {"big": 2004 - 8, "tiny": 8}  # tiny would get 1.49 x its size


def test_allocation_refuses_an_empty_table():
    with pytest.raises(ValueError, match=r"leaves table\(s\) \['a'\] with no active entry"):
        allocate({"a": (2, 2), "b": (1000, 10)}, 0.0001)


def test_cosine_schedule_values():
    assert cosine_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_fraction(100, 100, 0.3) == pytest.approx(0.0)
    sp = DynamicSparsity(0.5, update_fraction=0.4, stop_fraction=0.5, update_interval=10)
    sp.attach(_OneTable(4, 4))
    sp.start(torch.optim.SGD(sp.tables["table"].parameters(), lr=0.1), total_steps=100)
    assert sp.fraction(25) == pytest.approx(0.2) and sp.fraction(50) == 0.0
    assert [s for s in range(100) if sp.update_due(s)] == [10, 20, 30, 40]


# --- one update, by hand ---------------------------------------------------------------------


def _hand_table(regrow: str, momentum: float = 0.5):
    """A 2x4 table at density 0.5 with a known mask and weights; update_fraction 0.5 -> n = 2."""
    net = _OneTable(2, 4)
    sp = DynamicSparsity(0.5, regrow=regrow, update_fraction=0.5, momentum=momentum, stop_fraction=1.0)
    sp.attach(net)
    with torch.no_grad():
        net.table.weight_mask.copy_(torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))
        net.table.weight.copy_(torch.tensor([[0.5, -0.1, 0, 0], [0.3, -2.0, 0, 0]]))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    sp.start(opt, total_steps=100)
    return net, sp, opt


def _backward(net: _OneTable, grad: list[list[float]]) -> None:
    net.table.weight.grad = None
    (net.table.weight * torch.tensor(grad)).sum().backward()


ACTIVE_GRAD = [[9.0, 9.0], [9.0, 9.0]]  # large on active entries: those are never grown


def test_gradient_regrowth_drops_smallest_weights_and_grows_largest_dense_gradients():
    net, sp, _ = _hand_table("gradient")
    sp.keep_dense_gradients()
    _backward(net, [[9.0, 9.0, 0.2, -3.0], [9.0, 9.0, 1.0, 0.1]])
    assert torch.equal(net.table.weight.grad, torch.tensor([[9.0, 9.0, 0, 0], [9.0, 9.0, 0, 0]]))  # masked
    assert sp.update(0) == {"table": 4}
    # dropped: -0.1 at (0, 1) and 0.3 at (1, 0); grown: |-3| at (0, 3) and |1| at (1, 2)
    assert net.table.weight_mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert net.table.weight.tolist() == [[0.5, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]]


def test_momentum_regrowth_grows_by_the_moving_average_of_gradients():
    net, sp, _ = _hand_table("momentum", momentum=0.5)
    _backward(net, [[9.0, 9.0, 4.0, 0.0], [9.0, 9.0, 0.0, 0.0]])
    _backward(net, [[9.0, 9.0, 0.0, 1.5], [9.0, 9.0, 1.0, 0.1]])
    # EMA of the inactive entries: (0,2) 1.0, (0,3) 0.75, (1,2) 0.5, (1,3) 0.05 (the last gradient
    # alone would grow (0,3) and (1,2))
    torch.testing.assert_close(net.table.grad_momentum[:, 2:], torch.tensor([[1.0, 0.75], [0.5, 0.05]]))
    sp.update(0)
    assert net.table.weight_mask.tolist() == [[True, False, True, True], [False, True, False, False]]


def test_an_update_resets_the_optimizer_state_of_changed_entries_only():
    torch.manual_seed(0)
    net = _OneTable(6, 5)
    sp = DynamicSparsity(0.4, update_fraction=0.5, stop_fraction=1.0)
    sp.attach(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    sp.start(opt, total_steps=10)
    target = torch.randn(6, 5)
    for step in range(4):
        if step == 3:
            sp.keep_dense_gradients()
        opt.zero_grad()
        ((net.table.weight - target) ** 2).sum().backward()
        opt.step()
    before_mask = net.table.weight_mask.clone()
    state = {k: v.clone() for k, v in opt.state[net.table.weight].items()}
    weights = net.table.weight.detach().clone()
    sp.update(0)
    changed = before_mask ^ net.table.weight_mask
    assert int(changed.sum()) == 2 * round(0.5 * 12)
    for key in ("exp_avg", "exp_avg_sq"):
        now = opt.state[net.table.weight][key]
        assert (now[changed] == 0).all() and state[key][before_mask & changed].abs().min() > 0
        assert torch.equal(now[~changed], state[key][~changed])
    assert torch.equal(opt.state[net.table.weight]["step"], state["step"])
    assert (net.table.weight[changed] == 0).all()
    assert torch.equal(net.table.weight[~changed], weights[~changed])


def test_inactive_weights_stay_exactly_zero_under_adam():
    torch.manual_seed(0)
    net = BPRMF(U, N, embedding_dim=8)
    sp = DynamicSparsity(0.3)
    sp.attach(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=1e-3)
    sp.start(opt, total_steps=1000)
    users, items = torch.randint(0, U, (64,)), torch.randint(0, N, (64,))
    for _ in range(50):
        opt.zero_grad()
        (-net(users, items).sigmoid().log().mean()).backward()
        opt.step()
    for m in sp.tables.values():
        assert (m.weight[~m.weight_mask] == 0).all() and (m.weight.grad[~m.weight_mask] == 0).all()
        assert (m.weight[m.weight_mask] != 0).any()
    sp.check()


# --- training with Lightning, checkpoints ------------------------------------------------------


def test_training_keeps_the_budget_and_checkpoints_restore_the_masks(tmp_path: Path):
    torch.manual_seed(0)
    module = _module(BPRMF(U, N, embedding_dim=8))
    sp = module.sparsity
    checks, initial = [], {n: m.weight_mask.clone() for n, m in sp.tables.items()}
    original = sp.check
    sp.check = lambda: (checks.append(sum(int(m.weight_mask.sum()) for m in sp.tables.values())), original())
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_TinyData())
    assert len(checks) == 1 + 7  # start, then steps 2, 4, ..., 14 of 15
    assert set(checks) == {sp.budget} and sum(sp.allocated.values()) == sp.budget
    assert any(not torch.equal(initial[n], m.weight_mask) for n, m in sp.tables.items())  # masks moved
    assert trainer.callback_metrics["train/density"] == pytest.approx(sp.budget / ((U + N) * 8))
    assert "train/density/user_embedding" in trainer.callback_metrics

    export = SparseEmbeddingTables.load(tmp_path / SPARSE_EXPORT)  # written at fit end (last.ckpt)
    assert torch.equal(export["item_embedding"].to_dense(), module.net.item_embedding.weight.detach())

    fresh = _module(BPRMF(U, N, embedding_dim=8), seed=123)  # other random masks until loaded
    assert not torch.equal(fresh.net.user_embedding.weight_mask, module.net.user_embedding.weight_mask)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    fresh.load_state_dict(state)
    for name, m in fresh.sparsity.tables.items():
        assert torch.equal(m.weight_mask, sp.tables[name].weight_mask)
        assert torch.equal(m.weight, sp.tables[name].weight)
    fresh.sparsity.check()

    resumed = _module(BPRMF(U, N, embedding_dim=8), seed=123)
    _trainer(tmp_path / "resumed", epochs=4).fit(
        resumed, datamodule=_TinyData(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt"
    )
    assert resumed.sparsity.total_steps == 20
    resumed.sparsity.check()


def test_a_checkpoint_of_another_density_is_refused(tmp_path: Path):
    torch.manual_seed(0)
    module = _module(BPRMF(U, N, embedding_dim=8))
    _trainer(tmp_path, epochs=1).fit(module, datamodule=_TinyData())
    other = _module(BPRMF(U, N, embedding_dim=8), density=0.5)
    with pytest.raises(RuntimeError, match="sparsity budget broken"):
        _trainer(tmp_path / "b", epochs=2).fit(
            other, datamodule=_TinyData(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_sparse_run_trains_like_the_eager_one(tmp_path: Path):
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        module = _module(BPRMF(U, N, embedding_dim=8), cuda_graph=graphed)
        _trainer(tmp_path / str(graphed), epochs=4, accelerator="gpu").fit(module, datamodule=_TinyData())
        module.sparsity.check()
        for m in module.sparsity.tables.values():
            assert (m.weight[~m.weight_mask] == 0).all()
        runs[graphed] = module
    eager, graphed = runs[False].net, runs[True].net
    assert torch.equal(eager.item_embedding.weight_mask, graphed.item_embedding.weight_mask)
    torch.testing.assert_close(
        eager.item_embedding.weight, graphed.item_embedding.weight, rtol=1e-4, atol=1e-5
    )


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0}, r"density must be in \(0, 1\], got 0"),
        ({"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ({"density": 0.2, "update_interval": 0}, "update_interval must be >= 1"),
        ({"density": 0.2, "update_fraction": 1.0}, r"update_fraction must be in \[0, 1\)"),
        ({"density": 0.2, "stop_fraction": 0}, r"stop_fraction must be in \(0, 1\]"),
        ({"density": 0.2, "allocation": "random"}, "allocation must be one of"),
        ({"density": 0.2, "regrow": "random"}, "regrow must be one of"),
        ({"density": 0.8, "update_fraction": 0.3}, "the first update would regrow"),
        ({"density": 1.0, "update_fraction": 0.1}, "the first update would regrow"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsity(**kwargs)


def test_a_schedule_too_large_for_a_table_is_rejected_at_attach():
    sp = DynamicSparsity(0.5, allocation="erdos_renyi", update_fraction=0.1)
    with pytest.raises(ValueError, match=r"table 'user_embedding' \(2, 4\) keeps 8 active entries"):
        sp.attach(BPRMF(2, 1000, embedding_dim=4))  # ER keeps the 2-user table dense: nothing to grow


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.sparsity.density=1.5"], r"model.sparsity: density must be in \(0, 1\]"),
        (["model.sparsity.density=0"], r"model.sparsity: density must be in \(0, 1\]"),
        (["model.sparsity.update_interval=0"], "model.sparsity: update_interval must be >= 1"),
        (["model.sparsity.update_fraction=1.0"], "model.sparsity: update_fraction"),
        (
            ["model.sparsity.density=0.6", "model.sparsity.update_fraction=0.9"],
            "model.sparsity: update_fraction",
        ),
        (["+model.sparsity.densty=0.2"], "unexpected keyword argument 'densty'"),
        (["model=sasrec", "data=seq_ml100k"], "model.sparsity is only supported by"),
    ],
)
def test_train_rejects_bad_sparsity_configs(overrides, match, tmp_path: Path):
    cfg = compose_config("train", tmp_path, ["+sparsity@model.sparsity=dsl", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_sparsity_config(cfg)


@pytest.mark.parametrize("model", ["bpr_mf", "lightgcn"])
def test_the_dsl_config_composes_and_builds(model: str, tmp_path: Path):
    cfg = compose_config(
        "train", tmp_path, [f"model={model}", "+sparsity@model.sparsity=dsl", "model.sparsity.density=0.1"]
    )
    check_sparsity_config(cfg)
    assert cfg.model.sparsity.density == 0.1 and cfg.model.sparsity.seed == cfg.seed
    assert compose_config("train", tmp_path, [f"model={model}"]).model.sparsity is None


# --- static pruning and export -------------------------------------------------------------------


def test_magnitude_pruning_keeps_the_largest_weights_per_table():
    torch.manual_seed(0)
    net = BPRMF(U, N, embedding_dim=8)
    dense = net.user_embedding.weight.detach().clone()
    masks = prune_by_magnitude(net, 0.25)
    kept = masks["user_embedding"]
    assert int(kept.sum()) == 60 and int(masks["item_embedding"].sum()) == 80
    assert dense[kept].abs().min() >= dense[~kept].abs().max()
    assert (net.user_embedding.weight[~kept] == 0).all()


def test_export_round_trip_scores_like_the_masked_net(tmp_path: Path):
    torch.manual_seed(0)
    net = BPRMF(U, N, embedding_dim=16)
    DynamicSparsity(0.2).attach(net)
    written = export_sparse(net, tmp_path / "sparse.pt")
    assert not (tmp_path / "sparse.pt.tmp").exists()
    tables = SparseEmbeddingTables.load(tmp_path / "sparse.pt")
    assert tables["user_embedding"].col.dtype == torch.uint8
    assert tables.nbytes() == written.nbytes() < tables.dense_nbytes() == (U + N) * 16 * 4
    scorer = SparseDotScorer(tables)
    users = torch.arange(U)
    with torch.no_grad():
        torch.testing.assert_close(scorer.score_all(users), net.score_all(users))
        items = torch.randint(0, N, (U, 3))
        torch.testing.assert_close(scorer(users, items), net(users, items))
        torch.testing.assert_close(scorer(users, items[:, 0]), net(users, items[:, 0]))
    exclude = torch.rand(U, N) < 0.2
    assert torch.equal(scorer.recommend(users, 10, exclude), net.recommend(users, 10, exclude))


def test_lightgcn_export_loads_back_and_scores_the_same(tmp_path: Path):
    torch.manual_seed(0)
    data = _TinyData()
    net = LightGCN(U, N, embedding_dim=8, num_layers=2)
    net.set_graph(*data.train_pairs())
    DynamicSparsity(0.3).attach(net)
    export_sparse(net, tmp_path / "sparse.pt")
    other = LightGCN(U, N, embedding_dim=8, num_layers=2)
    other.set_graph(*data.train_pairs())
    load_sparse_into(other, tmp_path / "sparse.pt")
    users = torch.arange(U)
    with torch.no_grad():
        assert torch.equal(other.score_all(users), net.score_all(users))
    with pytest.raises(ValueError, match=r"holds tables \['embedding'\], but BPRMF has"):
        load_sparse_into(BPRMF(U, N, embedding_dim=8), tmp_path / "sparse.pt")
