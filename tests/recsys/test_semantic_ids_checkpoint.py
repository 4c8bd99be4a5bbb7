"""Semantic IDs from a trained LightGCN's item embeddings (``semantic_ids.source=checkpoint``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recsys import serving, train
from recsys.semantic_ids import checkpoint_vectors, for_datamodule
from tests.recsys.helpers import compose_config


def test_checkpoint_item_vectors_in_the_callers_order(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "lightgcn"
    overrides = ["+experiment=lightgcn_ml100k", "trainer.max_epochs=1", "test=false"]
    train.run(compose_config("train", out, [*overrides, "trainer.enable_progress_bar=false"]))
    ckpt = out / "checkpoints" / "epoch_000.ckpt"
    served = serving.load_recommender(ckpt)
    table, known = served.item_emb, served.datamodule.item_ids  # (1682, 64), dataset ids of its rows
    order = known[torch.randperm(known.numel(), generator=torch.Generator().manual_seed(0))]
    asked = torch.cat([order, torch.tensor([10**6])])  # and an item the checkpoint does not know
    vectors = checkpoint_vectors(ckpt, asked)
    row_of = {int(i): r for r, i in enumerate(known.tolist())}
    assert torch.equal(vectors[:-1], table[[row_of[int(i)] for i in order]])
    assert (vectors[-1] == 0).all()
    dm = SimpleNamespace(item_ids=order, metadata=None, dataset="movielens-100k")
    ids = for_datamodule(dm, source="checkpoint", checkpoint=ckpt, levels=2, codebook_size=16)
    assert ids.source == "checkpoint:epoch_000.ckpt" and ids.codes.shape == (known.numel(), 3)
    assert torch.equal(ids.item_ids, order) and ids.stats.utilisation == (1.0, 1.0)
    with pytest.raises(ValueError, match="needs semantic_ids.checkpoint"):
        for_datamodule(dm, source="checkpoint")
