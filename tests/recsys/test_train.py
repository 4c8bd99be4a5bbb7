"""End-to-end: every model config composes and trains; the BPR experiment is reproducible."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from recsys.train import run

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, [f"+experiment={experiment}"])
    assert cfg.experiment_name == experiment
    if "num_items" in cfg.model.net:  # id-based nets; feature nets size themselves from the data
        assert cfg.model.net.num_items == cfg.data.num_items


DATA_FOR = {
    "relmf": "coat",
    "two_tower": "ml100k_features",
    "sasrec": "seq_ml100k",
    "m2trec": "seq_ml100k",
    "onerec": "seq_ml100k",
}  # pointwise models: pointwise batches;
# feature models: a data config with features
# models that need recsys.augment's file: here they must refuse to train without it (they are
# trained end to end, augmentation included, in tests/recsys/test_augment.py)
NEEDS_AUGMENTATION = {"llmrec"}


@pytest.mark.parametrize("model", MODELS)
def test_model_config_trains_a_few_epochs(model: str, shared_data: Path, tmp_path: Path) -> None:
    data = DATA_FOR.get(model, "ml100k")
    cfg = _compose(
        tmp_path,
        [f"model={model}", f"data={data}", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
    )
    if model in NEEDS_AUGMENTATION:
        with pytest.raises(ValueError, match="set data.augmentation_path"):
            run(cfg)
        return
    metrics = run(cfg)
    for stage in ("val", "test"):
        for key in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"):
            assert 0.0 < metrics[stage][f"{stage}/{key}"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    split = {"coat": "MAR items split", "seq_ml100k": "leave-one-out"}.get(
        data, "random_split"
    )  # how each data config's split is reported
    assert "ndcg@10" in report and split in report
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["test"]["test/ndcg@10"] == metrics["test"]["test/ndcg@10"]


def test_bpr_ml100k_is_reproducible_to_the_last_digit(shared_data: Path, tmp_path: Path) -> None:
    overrides = ["+experiment=bpr_ml100k", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    first = run(_compose(tmp_path / "a", overrides))
    second = run(_compose(tmp_path / "b", overrides))
    assert first == second
    third = run(_compose(tmp_path / "c", overrides + ["seed=7"]))
    assert third["test"]["test/ndcg@10"] != first["test"]["test/ndcg@10"]


def test_missing_dataset_is_a_one_line_error_with_exit_code_2(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARROW_DATA_DIR": str(tmp_path / "nowhere"), "SPARROW_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.train", "+experiment=bpr_ml100k", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "dataset 'movielens-100k' not found" in out and "datasets/movielens-100k/README.md" in out
    assert "Traceback" not in out


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(module: str, args: list[str], tmp_path: Path, data_dir: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARROW_CACHE_DIR": str(tmp_path / "cache")}
    if data_dir is not None:
        env["SPARROW_DATA_DIR"] = data_dir
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={tmp_path}/run"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _run_in(runs: Path, name: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    cfg = _compose(runs / name, overrides)
    with open_dict(cfg):
        cfg.paths.runs_dir = str(runs)
    return run(cfg)


def test_resumed_run_matches_an_uninterrupted_one(shared_data: Path, tmp_path: Path) -> None:
    # lr 0.05: val NDCG@10 by epoch 0.1307, 0.1262, 0.1314, 0.1192, 0.1275, so the best epoch (2)
    # comes before the interruption (after epoch 3) and early stopping (patience 2) fires at
    # epoch 4 only if its wait count survives the resume; a reset ModelCheckpoint would pick 4.
    overrides = [
        "+experiment=bpr_ml100k",
        "trainer.enable_progress_bar=false",
        "model.optimizer.lr=0.05",
        "callbacks.early_stopping.patience=2",
        "callbacks.periodic_checkpoint.every_n_epochs=2",
    ]
    a = _run_in(tmp_path / "a", "1", overrides + ["trainer.max_epochs=10"])
    _run_in(tmp_path / "b", "1", overrides + ["trainer.max_epochs=4"])
    b = _run_in(tmp_path / "b", "2", overrides + ["trainer.max_epochs=10", "ckpt_path=last"])
    assert a == b

    report_a = json.loads((tmp_path / "a/1/metrics.json").read_text())
    report_b = json.loads((tmp_path / "b/2/metrics.json").read_text())
    assert sorted(report_a["history"], key=int) == [str(e) for e in range(5)]  # stopped after epoch 4
    assert report_b["history"] == report_a["history"]  # the resumed report covers every epoch
    assert (
        report_a["protocol"]["selected epoch (0-based)"]
        == 2
        == report_b["protocol"]["selected epoch (0-based)"]
    )
    assert report_b["protocol"]["selected checkpoint"] == str(tmp_path / "b/1/checkpoints/epoch_002.ckpt")
    assert report_b["protocol"]["resumed from"] == str(tmp_path / "b/1/checkpoints/last.ckpt")
    assert (tmp_path / "b/1/checkpoints/epoch_002.ckpt").is_file()  # the earlier run is left intact
    assert sorted(p.name for p in (tmp_path / "a/1/checkpoints").iterdir()) == [
        "epoch_002.ckpt",
        "last.ckpt",
        "periodic_epoch_001.ckpt",
        "periodic_epoch_003.ckpt",
    ]
    text = (tmp_path / "b/2/report.md").read_text()
    for png in ("learning_curves.png", "val_metrics_at_k.png", "test_metrics_at_k.png"):
        assert f"]({png})" in text
        assert (tmp_path / "b/2" / png).read_bytes().startswith(PNG_MAGIC)


def test_last_is_the_newest_runs_last_ckpt(tmp_path: Path) -> None:
    import os

    from recsys.checkpoint import CheckpointError, resolve

    with pytest.raises(CheckpointError, match="no run under"):
        resolve("last", tmp_path)
    for i, name in enumerate(["2024-01-02_00-00-00", "2024-01-01_00-00-00"]):
        path = tmp_path / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))  # the second (older name) was written last
    assert resolve("last", tmp_path) == str(tmp_path / "2024-01-01_00-00-00/checkpoints/last.ckpt")
    assert resolve(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(str(tmp_path / "missing.ckpt"), tmp_path)


def _fake_checkpoint(path: Path, cfg, **changes) -> Path:
    import torch
    from omegaconf import OmegaConf

    from recsys.checkpoint import Fingerprint

    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = {**Fingerprint.of(config).__dict__, **{k: v for k, v in changes.items() if k != "net"}}
    config["model"]["net"].update(changes.get("net", {}))
    torch.save(
        {"epoch": 3, "state_dict": {}, "sparrow": {"config": config, "fingerprint": fingerprint}}, path
    )
    return path


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model": "recsys.models.lightgcn.LightGCN"}, ["recsys.models.lightgcn.LightGCN", "BPRMF"]),
        (
            {"dataset": "movielens-1m", "num_users": 6040, "num_items": 3706},
            ["movielens-1m", "movielens-100k"],
        ),
        ({"net": {"embedding_dim": 32}}, ["embedding_dim=32 vs 64"]),
    ],
)
def test_checkpoint_of_another_model_or_dataset_is_refused(tmp_path: Path, changes, named) -> None:
    from recsys.checkpoint import CheckpointError, check_compatible

    cfg = _compose(tmp_path, ["+experiment=bpr_ml100k"])
    ckpt = _fake_checkpoint(tmp_path / "other.ckpt", cfg, **changes)
    with pytest.raises(CheckpointError) as err:
        check_compatible(ckpt, cfg)
    assert all(name in str(err.value) for name in named)
    assert check_compatible(_fake_checkpoint(tmp_path / "same.ckpt", cfg), cfg)["epoch"] == 3


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    import torch

    from recsys.checkpoint import CheckpointError, load_info

    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_info(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a Sparrow training checkpoint"):
        load_info(tmp_path / "plain.ckpt")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.net.embedding_dim=0", "model.net.embedding_dim must be a positive integer, got 0"),
        ("model.net.embedding_dim=-3", "got -3"),
        ("model.net.embedding_dim=1.5", "got 1.5"),
        ("model.net.embedding_dim=abc", "got 'abc'"),
        ("model.net.embedding_dim=true", "got True"),
        ("model=lightgcn model.net.num_layers=0", "model.net.num_layers must be a positive integer, got 0"),
    ],
)
def test_bad_sizes_are_rejected_at_config_time(override: str, message: str, tmp_path: Path) -> None:
    from recsys.train import ConfigError, check_model_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_model_config(_compose(tmp_path, ["+experiment=bpr_ml100k", *override.split()]))


def test_unknown_config_option_lists_the_available_ones() -> None:
    from retrieval.cli import ConfigError, check_overrides

    check_overrides(
        ["+experiment=bpr_ml100k", "model=bpr_mf,lightgcn", "trainer.max_epochs=3", "data.root=x"]
    )
    with pytest.raises(
        ConfigError, match=r"unknown experiment 'nope' in \+experiment=nope; available: .*bpr_ml100k"
    ):
        check_overrides(["+experiment=nope"])
    with pytest.raises(ConfigError, match="unknown model 'mf'"):
        check_overrides(["model=mf"])


@pytest.mark.parametrize("case", ["unknown_experiment", "bad_embedding_dim", "other_dataset_checkpoint"])
def test_bad_input_is_a_one_line_error_with_exit_code_2(case: str, tmp_path: Path) -> None:
    args = {
        "unknown_experiment": ["+experiment=bpr_ml100kk"],
        "bad_embedding_dim": ["+experiment=bpr_ml100k", "model.net.embedding_dim=0"],
        "other_dataset_checkpoint": ["+experiment=bpr_ml100k", f"ckpt_path={tmp_path}/other.ckpt"],
    }[case]
    expected = {
        "unknown_experiment": "unknown experiment 'bpr_ml100kk' in +experiment=bpr_ml100kk; available: ",
        "bad_embedding_dim": "model.net.embedding_dim must be a positive integer, got 0",
        "other_dataset_checkpoint": "holds recsys.models.bpr_mf.BPRMF on movielens-1m (6040 users, 3706 "
        "items), but this run trains recsys.models.bpr_mf.BPRMF on movielens-100k (943 users, 1682 items)",
    }[case]
    if case == "other_dataset_checkpoint":
        cfg = _compose(tmp_path, ["+experiment=bpr_ml100k"])
        _fake_checkpoint(tmp_path / "other.ckpt", cfg, dataset="movielens-1m", num_users=6040, num_items=3706)
    proc = _cli("recsys.train", args, tmp_path, data_dir=str(tmp_path / "no-data"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert expected in out and "Traceback" not in out
    assert len([line for line in out.splitlines() if "ERROR" in line]) == 1


def test_compiled_net_trains_to_the_same_numbers(shared_data: Path, tmp_path: Path) -> None:
    """``model.compile=true`` (torch.compile) must not change what is learned."""
    base = ["+experiment=bpr_ml100k", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    plain = run(_compose(tmp_path / "plain", base))
    compiled = run(_compose(tmp_path / "compiled", base + ["model.compile=true"]))
    for stage in ("val", "test"):
        for key, value in plain[stage].items():
            assert compiled[stage][key] == pytest.approx(value, abs=1e-5)


def test_cuda_graph_option_changes_nothing_on_the_cpu(shared_data: Path, tmp_path: Path) -> None:
    """``model.cuda_graph=true`` is a GPU speed-up only: on the CPU it trains the same numbers."""
    base = ["+experiment=lightgcn_ml100k", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"]
    base += ["trainer.enable_progress_bar=false"]
    plain = run(_compose(tmp_path / "plain", base))
    graphed = run(_compose(tmp_path / "graphed", base + ["model.cuda_graph=true"]))
    assert graphed == plain


def test_compile_option_compiles_the_net_in_place() -> None:
    from types import SimpleNamespace

    import torch

    from recsys.lit.pairwise import PairwiseRecommender
    from recsys.models.bpr_mf import BPRMF
    from retrieval.eval.topk_evaluator import TopKEvaluator

    module = PairwiseRecommender(BPRMF(3, 4), torch.optim.Adam, TopKEvaluator(), compile=True)
    module._trainer = SimpleNamespace(datamodule=None)
    assert module.net._compiled_call_impl is None
    module.setup("fit")
    assert module.net._compiled_call_impl is not None
    assert list(module.net.state_dict()) == ["user_embedding.weight", "item_embedding.weight"]


def test_fixed_budget_without_validation_tests_the_last_epoch(shared_data: Path, tmp_path: Path) -> None:
    """lightgcn_gowalla: the paper's protocol has no validation data; test once, at the last epoch."""
    cfg = _compose(
        tmp_path,
        [
            "+experiment=lightgcn_gowalla",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=2",
            "trainer.enable_progress_bar=false",
            "model.net.embedding_dim=8",
        ],
    )
    metrics = run(cfg)
    assert "val" not in metrics  # nothing to validate on
    assert 0.0 < metrics["test"]["test/recall@20"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "none (fixed budget)" in report and "selected epoch (0-based)**: 1" in report


def test_relmf_coat_reports_both_protocols(shared_data: Path, tmp_path: Path) -> None:
    cfg = _compose(
        tmp_path, ["+experiment=relmf_coat", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    )
    metrics = run(cfg)
    for stage in ("val", "test"):
        for key in ("mar/dcg@1", "mar/dcg@5", "mar/map@5", "mar/recall@5", "ndcg@5", "recall@10"):
            assert metrics[stage][f"{stage}/{key}"] > 0.0, key
        assert (
            metrics[stage][f"{stage}/mar/recall@5"] > metrics[stage][f"{stage}/recall@5"]
        )  # 8 candidates vs 300
    report = (tmp_path / "report.md").read_text()
    assert (
        "mar/dcg@5"
        in report.splitlines()[
            [i for i, line in enumerate(report.splitlines()) if line.startswith("| stage")][0]
        ]
    )
    assert "propensity popularity" in report and "best val/mar/dcg@5 on validation" in report


def test_a_pointwise_model_on_pairwise_batches_is_refused(shared_data: Path, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, ["model=relmf", "data=coat", "data.training=pairwise", "trainer.max_epochs=1"])
    with pytest.raises(ValueError, match="PointwiseRecommender trains on pointwise batches"):
        run(cfg)
