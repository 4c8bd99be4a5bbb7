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
    assert cfg.model.net.num_items == cfg.data.num_items


@pytest.mark.parametrize("model", MODELS)
def test_model_config_trains_a_few_epochs(model: str, shared_data: Path, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, [f"model={model}", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"])
    metrics = run(cfg)
    for stage in ("val", "test"):
        for key in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"):
            assert 0.0 < metrics[stage][f"{stage}/{key}"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "ndcg@10" in report and "random_split" in report
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
