"""PairwiseRecommender's evaluation: the stage's sets are fetched once, the metrics are the evaluator's."""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from recsys.lit.pairwise import PairwiseRecommender
from recsys.models.bpr_mf import BPRMF
from retrieval.eval.topk_evaluator import TopKEvaluator
from retrieval.types import ItemSets

U, N = 40, 25


def _sets(nnz: int, seed: int) -> ItemSets:
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randint(0, U, (nnz,), generator=g), torch.randint(0, N, (nnz,), generator=g)
    return ItemSets.from_pairs(users, items, U, N)


class _CountingData(L.LightningDataModule):
    """Evaluation batches of 8 users; counts how often the module asks for each stage's sets."""

    def __init__(self):
        super().__init__()
        self.sets = {"val": (_sets(60, 1), _sets(300, 2)), "test": (_sets(60, 3), _sets(300, 4))}
        self.calls: Counter[tuple[str, str]] = Counter()

    def targets(self, stage: str, protocol: str = "") -> ItemSets:
        self.calls["targets", stage + protocol] += 1
        return self.sets[stage][0]

    def exclude(self, stage: str, protocol: str = "") -> ItemSets:
        self.calls["exclude", stage + protocol] += 1
        return self.sets[stage][1] if not protocol else _sets(400, 5)

    def _loader(self) -> DataLoader:
        return DataLoader([{"users": users} for users in torch.arange(U).split(8)], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


@pytest.mark.parametrize("stage", ["val", "test"])
def test_sets_are_fetched_once_per_epoch_and_metrics_are_the_evaluators(stage):
    torch.manual_seed(0)
    evaluator = TopKEvaluator(ks=(5, 10))
    module = PairwiseRecommender(BPRMF(U, N, embedding_dim=8), torch.optim.Adam, evaluator)
    data = _CountingData()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    run = trainer.validate if stage == "val" else trainer.test
    logged = [run(module, datamodule=data)[0] for _ in range(2)]
    assert data.calls == {("targets", stage): 2, ("exclude", stage): 2}  # per epoch, not per batch (5)
    expected = evaluator(module.net.score_all, *data.sets[stage], prefix=f"{stage}/")
    for out in logged:
        assert set(out) == set(expected) - {f"{stage}/num_users"}
        for name, value in out.items():
            assert value == pytest.approx(expected[name], abs=1e-6), name


def test_extra_protocols_are_logged_under_their_names():
    """An extra evaluator ranks with the datamodule's sets of its protocol, once per epoch."""
    torch.manual_seed(0)
    main, extra = TopKEvaluator(ks=(5,), metrics=["ndcg"]), TopKEvaluator(ks=(1, 3), metrics=["dcg", "map"])
    module = PairwiseRecommender(
        BPRMF(U, N, embedding_dim=8), torch.optim.Adam, main, extra_evaluators={"mar": extra}
    )
    data = _CountingData()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    out = trainer.validate(module, datamodule=data)[0]
    assert data.calls == {
        ("targets", "val"): 1,
        ("exclude", "val"): 1,
        ("targets", "valmar"): 1,
        ("exclude", "valmar"): 1,
    }
    expected = extra(module.net.score_all, data.sets["val"][0], _sets(400, 5), prefix="val/mar/")
    assert {k for k in out if k.startswith("val/mar/")} == {
        "val/mar/dcg@1",
        "val/mar/dcg@3",
        "val/mar/map@1",
        "val/mar/map@3",
    }
    for name in ("val/mar/dcg@3", "val/mar/map@1"):
        assert out[name] == pytest.approx(expected[name], abs=1e-6)
    assert out["val/ndcg@5"] == pytest.approx(
        main(module.net.score_all, *data.sets["val"], prefix="val/")["val/ndcg@5"], abs=1e-6
    )
