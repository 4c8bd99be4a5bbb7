"""`python -m recsys.augment` end to end: a base BPR-MF run on ML-100K, then LLMRec's side
information from the offline provider (not an LLM) for a few users."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.augment import run as augment_run
from recsys.llm.augment import Augmentation
from recsys.train import ConfigError
from recsys.train import run as train_run
from tests.recsys.helpers import compose_config


def test_augment_a_trained_run(shared_data: Path, tmp_path: Path) -> None:
    train_run(
        compose_config(
            "train",
            tmp_path / "run",
            ["+experiment=bpr_ml100k", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
        )
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_config("augment", tmp_path / "aug", [f"ckpt_path={ckpt}", "max_users=12", "candidates=4"])
    out = augment_run(cfg)
    aug = Augmentation.load(out)
    assert aug.provider == "offline metadata templates (not an LLM)"
    assert aug.user_emb.shape == (943, 384) and aug.item_emb.shape == (1682, 384)
    assert aug.user_emb[:12].norm(dim=1).min() > 0.99 and aug.user_emb[12:].abs().sum() == 0  # max_users
    assert aug.pairs.shape == (12, 3) and aug.fallbacks["pick_pair"] == {}
    assert (out.parent / "augmentation.json").exists()
    with pytest.raises(ConfigError, match="candidates must be >= 2"):
        augment_run(compose_config("augment", tmp_path / "aug2", [f"ckpt_path={ckpt}", "candidates=1"]))

    # LLMRec trains on it (same data and seed: same split) and reports the NGCF-style NDCG beside NDCG
    llmrec = ["+experiment=llmrec_ml100k", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    metrics = train_run(
        compose_config("train", tmp_path / "llmrec", [*llmrec, f"data.augmentation_path={out}"])
    )
    assert metrics["test"]["test/ndcg@10"] > 0.05 and "test/ndcg_ngcf@10" in metrics["test"]
    report = (tmp_path / "llmrec" / "report.md").read_text()  # the provider is named, fallbacks counted
    assert "**side information**: offline metadata templates (not an LLM)" in report
    assert "fell back to no augmentation, per task: {'item_attributes': 0" in report
    with pytest.raises(ValueError, match="another training split"):  # another seed: another split
        train_run(
            compose_config(
                "train", tmp_path / "llmrec2", [*llmrec, f"data.augmentation_path={out}", "seed=7"]
            )
        )
