"""GenerativeRecommender: pre-training, a DPO round, list generation through the harness, the reward
model, expert utilisation, and a checkpoint from other semantic IDs refused."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch

from recsys.data.sequences import SequenceDataModule
from recsys.lit.generative import GenerativeRecommender
from recsys.models.onerec import OneRec
from recsys.semantic_ids import for_datamodule
from retrieval.eval.topk_evaluator import TopKEvaluator
from tests.recsys.lit.test_sequential import category_walks


def module(levels: int = 2) -> GenerativeRecommender:
    return GenerativeRecommender(
        net=partial(OneRec, embedding_dim=32, num_heads=2, num_experts=4, expert_hidden=32, dropout=0.0),
        semantic_ids=partial(for_datamodule, source="collaborative", levels=levels, codebook_size=8, dim=16),
        optimizer=partial(torch.optim.Adam, lr=0.01),
        evaluator=TopKEvaluator(ks=(10,), metrics=("recall", "ndcg")),
        extra_evaluators={"session": TopKEvaluator(ks=(3,), metrics=("hit", "recall"))},
        list_len=3,
        cuts_per_row=2,
        pretrain_epochs=16,
        rounds=1,
        round_epochs=1,
        num_samples=3,
        eval_beam=10,
        session_beam=3,
        reward_steps=200,
        seed=0,
    )


def datamodule() -> SequenceDataModule:
    return SequenceDataModule.from_data(
        category_walks(), split="session_time", max_len=5, batch_size=64, horizon=3, seed=0
    )


def trainer(tmp_path, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    L.seed_everything(0)
    tmp = tmp_path_factory.mktemp("onerec")
    dm, lit, t = datamodule(), module(), trainer(tmp, 17)
    t.fit(lit, datamodule=dm)
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    test = t.test(lit, datamodule=dm, verbose=False)[0]
    ckpt = tmp / "final.ckpt"
    t.save_checkpoint(ckpt)
    return {"logged": logged, "test": test, "lit": lit, "ckpt": ckpt, "tmp": tmp}


def test_learns_the_walk_and_generates_lists(fitted: dict) -> None:
    # the next item is one of the 2 items of the next category: recall@10 near 1; chance is 10 / 120
    assert fitted["test"]["test/recall@10"] > 0.8
    # a list of 3 against the next (up to) 3 clicks: each is one of the 2 items of its category, so a
    # perfect model hits a full future with 1 - 0.5^3 = 0.875, one click with 0.5; chance is about 0.07
    assert fitted["test"]["test/session/hit@3"] > 0.6
    assert 0.0 < fitted["test"]["test/reward"] <= 1.0


def test_alignment_ran_and_experts_were_used(fitted: dict) -> None:
    logged = fitted["logged"]
    assert "train/sample_reward" in logged and "train/reward_gap" in logged  # the DPO epoch ran
    assert fitted["lit"]._reference  # a frozen reference
    assert logged["moe/starved"] == 0 and logged["moe/min_share"] > 0.02


def test_phase_ends_are_recorded(fitted: dict) -> None:
    phases = fitted["lit"].phases
    assert list(phases) == ["pre-training", "round 1"]
    assert phases["pre-training"]["moe/starved"] == 0 and "val/reward" in phases["round 1"]
    saved = json.loads((fitted["tmp"] / "phases.json").read_text())
    assert saved["round 1"]["val/recall@10"] == phases["round 1"]["val/recall@10"]


def test_reward_model_ranks_real_next_clicks_over_random_items(fitted: dict) -> None:
    assert fitted["lit"]._reward_auc > 0.7


def test_checkpoint_of_other_semantic_ids_is_refused(fitted: dict) -> None:
    dm, other = datamodule(), module(levels=1)
    t = trainer(fitted["tmp"] / "other", 1)
    with pytest.raises(ValueError, match="semantic IDs"):
        t.test(other, datamodule=dm, ckpt_path=str(fitted["ckpt"]), verbose=False)
