"""Re-evaluating a checkpoint reproduces the training run's numbers and writes the same report."""

import json
from pathlib import Path

import pytest

from recsys import evaluate, train
from tests.recsys.helpers import compose_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-epoch BPR run: (its folder, its val/test metrics)."""
    out = tmp_path_factory.mktemp("train") / "run"
    overrides = ["+experiment=bpr_ml100k", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    metrics = train.run(compose_config("train", out, overrides))
    return out, metrics


def _selected(run_dir: Path) -> str:
    return json.loads((run_dir / "metrics.json").read_text())["protocol"]["selected checkpoint"]


@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluate_reproduces_the_training_runs_metrics(trained, split: str, tmp_path: Path) -> None:
    run_dir, metrics = trained
    got = evaluate.run(
        compose_config("evaluate", tmp_path, [f"ckpt_path={_selected(run_dir)}", f"split={split}"])
    )
    assert got == {split: metrics[split]}  # to the last digit
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == got and saved["protocol"]["checkpoint epoch (0-based)"] == 1
    assert sorted(saved["history"]) == ["0", "1"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"# bpr_ml100k: {split} re-evaluation") and "random_split" in report
    for png in ("learning_curves.png", f"{split}_metrics_at_k.png"):
        assert f"]({png})" in report and (tmp_path / png).read_bytes().startswith(PNG_MAGIC)


def test_evaluate_with_other_cut_offs(trained, tmp_path: Path) -> None:
    run_dir, metrics = trained
    overrides = [f"ckpt_path={_selected(run_dir)}", "evaluator=topk", "evaluator.ks=[5,10]"]
    got = evaluate.run(compose_config("evaluate", tmp_path, overrides))["test"]
    assert got["test/ndcg@10"] == metrics["test"]["test/ndcg@10"] and "test/ndcg@5" in got
    assert "test/ndcg@20" not in got


@pytest.mark.parametrize(
    ("overrides", "message"),
    [([], "ckpt_path is required"), (["ckpt_path=x.ckpt", "split=train"], "split must be one of val, test")],
)
def test_evaluate_rejects_bad_arguments(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(train.ConfigError, match=message):
        evaluate.run(compose_config("evaluate", tmp_path, overrides))


def test_evaluate_command_line(trained, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    run_dir, metrics = trained
    cmd = [
        sys.executable,
        "-m",
        "recsys.evaluate",
        f"ckpt_path={_selected(run_dir)}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "SPARROW_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test"] == metrics["test"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()

    missing = subprocess.run(
        [*cmd[:3], f"ckpt_path={tmp_path}/none.ckpt", f"hydra.run.dir={tmp_path}/2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = missing.stdout + missing.stderr
    assert missing.returncode == 2 and "none.ckpt does not exist" in out and "Traceback" not in out
