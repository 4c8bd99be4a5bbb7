import json
from pathlib import Path

import pytest

from retrieval.eval.report import atomic_write_text, metrics_table, write_report


def test_metrics_table_orders_columns_and_drops_prefixes() -> None:
    table = metrics_table(
        {
            "val": {"val/recall@20": 0.5, "val/ndcg@10": 0.25, "val/mrr": 0.125, "val/num_users": 9.0},
            "test": {"test/ndcg@20": 0.3, "test/ndcg@10": 0.2},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| stage | mrr | ndcg@10 | ndcg@20 | recall@20 |"
    assert lines[2] == "| val | 0.1250 | 0.2500 |  | 0.5000 |"
    assert lines[3] == "| test |  | 0.2000 | 0.3000 |  |"


def test_metrics_table_keeps_protocol_segments_apart() -> None:
    """Two protocols may share a metric name: ``val/recall@5`` and ``val/mar/recall@5`` are two columns."""
    table = metrics_table({"val": {"val/recall@5": 0.1, "val/mar/recall@5": 0.7, "val/mar/num_users": 3.0}})
    lines = table.splitlines()
    assert lines[0] == "| stage | mar/recall@5 | recall@5 |"
    assert lines[2] == "| val | 0.7000 | 0.1000 |"


def test_write_report_writes_both_files(tmp_path: Path) -> None:
    metrics = {"val": {"val/ndcg@10": 0.1}, "test": {"test/ndcg@10": 0.2}}
    report = write_report(tmp_path, "exp", metrics, {"dataset": "d"}, {"fit": 1.5}, "a: 1\n")
    text = report.read_text()
    assert text.startswith("# exp") and "- **dataset**: d" in text and "- fit: 1.5 s" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md"]


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "r.md"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # type: ignore[arg-type]  # write() rejects a non-str
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


def test_report_links_figures_and_saves_extra_entries(tmp_path: Path) -> None:
    metrics = {"test": {"test/ndcg@10": 0.2}}
    history = {0: {"train/loss": 0.5}}
    figures = {"learning curves": "learning_curves.png"}
    text = write_report(
        tmp_path, "exp", metrics, {}, {}, "", figures=figures, extra={"history": history}
    ).read_text()
    assert "## Figures\n\n![learning curves](learning_curves.png)\n" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["history"] == {"0": {"train/loss": 0.5}}


def test_atomic_write_bytes(tmp_path: Path) -> None:
    from retrieval.eval.report import atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.png", b"\x89PNG")
    assert (tmp_path / "a.png").read_bytes() == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
