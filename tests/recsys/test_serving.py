"""Serving a trained two-tower model through faiss item indexes, and the two commands around it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from recsys import index_items, recommend, serving, train
from recsys.checkpoint import CheckpointError
from retrieval.index.manifest import IndexFormatError, read_manifest
from tests.recsys.helpers import compose_config


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """A 1-epoch two-tower run on ML-100K features: (its selected checkpoint, its test metrics)."""
    out = tmp_path_factory.mktemp("serving") / "run"
    overrides = [
        "model=two_tower",
        "data=ml100k_features",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    metrics = train.run(compose_config("train", out, overrides))
    return out / "checkpoints" / "epoch_000.ckpt", metrics["test"]


@pytest.fixture(scope="module")
def served(trained) -> serving.TrainedRecommender:
    return serving.load_recommender(trained[0])


@pytest.fixture(scope="module")
def flat(served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("indexes") / "flat"
    serving.export_item_index(served, out)
    return out


def test_flat_index_reproduces_the_full_sort_evaluator(trained, served, flat: Path) -> None:
    _, trained_test = trained
    manifest = read_manifest(flat)
    assert manifest.encoder_checksum == served.checksum and manifest.num_docs == 1682
    assert manifest.extra["dataset"] == "movielens-100k" and manifest.extra["num_items"] == 1682
    through_index = serving.evaluate(served, "test", serving.open_item_index(flat, served))
    full_sort = serving.evaluate(served, "test")  # the TopKEvaluator on the same embeddings
    assert through_index == full_sort  # same keys, same values to the last digit
    assert through_index["test/num_users"] == 943.0
    # and the training run's own test numbers (Lightning logs them as float32)
    assert {k: v for k, v in through_index.items() if k in trained_test} == pytest.approx(
        trained_test, rel=1e-6
    )
    assert set(trained_test) <= set(through_index)


def test_ivf_probing_every_list_equals_flat(trained, served, flat: Path, tmp_path: Path) -> None:
    out = tmp_path / "ivf"
    overrides = [f"ckpt_path={trained[0]}", f"out={out}", "factory=[IVF16,Flat]", "nprobe=4"]
    manifest = index_items.run(compose_config("index_items", tmp_path / "log", overrides))
    assert manifest.extra["factory"] == "IVF16,Flat" and manifest.extra["nprobe"] == 4

    users = torch.arange(943)
    exclude = served.datamodule.exclude("test")
    _, exact = serving.rank(served, users, 50, exclude, serving.open_item_index(flat, served))
    _, every_list = serving.rank(served, users, 50, exclude, serving.open_item_index(out, served, nprobe=16))
    assert torch.equal(every_list, exact)
    _, four = serving.rank(served, users, 50, exclude, serving.open_item_index(out, served))  # stored nprobe
    assert 0.0 < serving.recall_against(exact, four) < 1.0
    assert not torch.isin(four[0], exclude.indices[exclude.indptr[0] : exclude.indptr[1]]).any()

    with pytest.raises(IndexFormatError, match="already exists; pass overwrite=true"):
        index_items.run(compose_config("index_items", tmp_path / "log2", overrides))


def test_an_index_of_another_checkpoint_is_refused(trained, served, flat: Path) -> None:
    other = serving.load_recommender(trained[0].with_name("last.ckpt"))  # same weights, another file
    with pytest.raises(
        IndexFormatError, match=r"was built from checkpoint .*epoch_000\.ckpt .*not from .*last\.ckpt"
    ):
        serving.open_item_index(flat, other)
    fewer = dataclasses.replace(served, item_emb=served.item_emb[:-1])
    with pytest.raises(IndexFormatError, match="holds 1682 vectors .* has 1681 items"):
        serving.open_item_index(flat, fewer)


def test_recommend_prints_k_titled_items_per_user(
    trained, served, flat: Path, tmp_path: Path, capsys
) -> None:
    common = [f"ckpt_path={trained[0]}", "users=[0,941]", "k=7"]
    got = recommend.run(compose_config("recommend", tmp_path, common))
    table = capsys.readouterr().out
    assert list(got) == [0, 941] and all(len(items) == 7 for items in got.values())
    assert "user 0 (raw id 1):" in table and "user 941 (raw id 942):" in table
    rows = [line for line in table.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+-?\d\.\d{4}  ", line)]
    assert len(rows) == 14 and all(re.search(r"\(\d{4}\)$", r) for r in rows)  # ML-100K titles end in a year
    train_sets = served.datamodule.train_sets
    for user, items in got.items():
        trained_on = set(train_sets.indices[train_sets.indptr[user] : train_sets.indptr[user + 1]].tolist())
        assert not trained_on & {item for item, _, _ in items}  # ML-100K keeps every id: compact = dataset
        assert [s for _, s, _ in items] == sorted((s for _, s, _ in items), reverse=True)

    via_index = recommend.run(compose_config("recommend", tmp_path, [*common, f"index_dir={flat}"]))
    assert f"Flat index {flat}" in capsys.readouterr().out
    for user, items in got.items():  # same items; scores from faiss's sums, equal up to float rounding
        assert [(i, t) for i, _, t in via_index[user]] == [(i, t) for i, _, t in items]
        assert [s for _, s, _ in via_index[user]] == pytest.approx([s for _, s, _ in items], abs=1e-6)


@pytest.mark.parametrize(
    ("users", "message"),
    [
        (
            "users=[3,943]",
            r"unknown user id\(s\) 943; movielens-100k users in this run have dataset ids 0\.\.942",
        ),
        ("users=[]", "users is required"),
    ],
)
def test_recommend_refuses_bad_users(trained, users: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(train.ConfigError, match=message):
        recommend.run(compose_config("recommend", tmp_path, [f"ckpt_path={trained[0]}", users]))


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="none.ckpt does not exist"):
        serving.load_recommender(tmp_path / "none.ckpt")


class _NoEmbeddings(nn.Module):
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return torch.zeros(users.numel(), 3)


class _Wrapper(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _NoEmbeddings()


def test_a_model_without_embeddings_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"_NoEmbeddings .*defines no embeddings\(\)"):
        serving.embeddings_of(_Wrapper(), "x.ckpt")
