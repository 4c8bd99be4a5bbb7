"""SequentialRecommender: trains SASRec and M2TRec end to end; only metadata reaches cold items."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from recsys.data.diginetica import SessionData
from recsys.data.sequences import SequenceDataModule
from recsys.lit.sequential import SequentialRecommender
from recsys.models.m2trec import M2TRec
from recsys.models.sasrec import SASRec
from retrieval.eval.topk_evaluator import TopKEvaluator
from tests.recsys.helpers import sessions_like

NUM_ITEMS, NUM_SESSIONS, LENGTH = 120, 600, 6


def category_walks() -> SessionData:
    """Sessions that walk through categories: an item of category c is followed by one of c + 1.

    Item i has category i // 2, so every item shares its metadata with one other item: a model that
    reads metadata can score an item it never trained on as well as its sibling.
    """
    g = torch.Generator().manual_seed(0)
    categories = NUM_ITEMS // 2
    rows = []
    for s in range(NUM_SESSIONS):
        c = int(torch.randint(categories, (1,), generator=g))
        for t in range(LENGTH):
            item = 2 * ((c + t) % categories) + int(torch.randint(2, (1,), generator=g))
            rows.append((s, item, 1000 * t, s * 30 // NUM_SESSIONS))
    return sessions_like(rows, [i // 2 for i in range(NUM_ITEMS)])


def fit_and_test(net, tmp_path, category_weight: float = 0.0) -> dict[str, float]:
    L.seed_everything(0)
    dm = SequenceDataModule.from_data(
        category_walks(), split="session_time", max_len=5, batch_size=64, cold_share=0.1, seed=0
    )
    module = SequentialRecommender(
        net=net,
        optimizer=partial(torch.optim.Adam, lr=0.005),
        evaluator=TopKEvaluator(ks=(10,), metrics=("recall", "ndcg")),
        extra_evaluators={"cold": TopKEvaluator(ks=(10,), metrics=("recall", "ndcg"))},
        category_weight=category_weight,
    )
    trainer = L.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return val | test


@pytest.fixture(scope="module")
def sasrec(tmp_path_factory) -> dict[str, float]:
    net = partial(SASRec, embedding_dim=32, num_blocks=1, dropout=0.0)
    return fit_and_test(net, tmp_path_factory.mktemp("sasrec"))


@pytest.fixture(scope="module")
def m2trec(tmp_path_factory) -> dict[str, float]:
    net = partial(M2TRec, embedding_dim=32, num_blocks=1, dropout=0.0, pooling="last")
    return fit_and_test(net, tmp_path_factory.mktemp("m2trec"), category_weight=0.5)


def test_both_models_learn_the_walk_on_warm_items(sasrec: dict, m2trec: dict) -> None:
    # two items per category, so a perfect model has recall@10 = 1 and chance is 10 / 120
    assert sasrec["test/recall@10"] > 0.9
    assert m2trec["test/recall@10"] > 0.9


def test_only_metadata_scores_cold_items(sasrec: dict, m2trec: dict) -> None:
    # the cold item ties with its warm sibling; misses are mostly rows whose previous item was cold
    # too (dropped from the history, so the walk skips a category): 0.85 here
    assert m2trec["test/cold/recall@10"] > 0.7
    assert sasrec["test/cold/recall@10"] < 0.3  # its vectors for cold items were never trained


def test_cold_protocol_is_test_only(sasrec: dict) -> None:
    assert "val/recall@10" in sasrec
    assert not any(k.startswith("val/cold/") for k in sasrec)


def test_category_weight_needs_a_metadata_aware_net(tmp_path) -> None:
    with pytest.raises(ValueError, match="metadata-aware"):
        fit_and_test(partial(SASRec, embedding_dim=8), tmp_path, category_weight=0.5)
