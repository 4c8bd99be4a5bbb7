import struct
from pathlib import Path

import pytest

from retrieval.eval.plots import learning_curves, metrics_at_k, write_figures
from retrieval.eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = {e: {"train/loss": 0.7 - 0.1 * e, "val/ndcg@10": 0.1 + 0.02 * e} for e in range(4)}
METRICS = {
    "val": {
        "val/ndcg@10": 0.2,
        "val/ndcg@20": 0.25,
        "val/recall@10": 0.3,
        "val/recall@20": 0.4,
        "val/mrr": 0.3,
    },
    "test": {"test/ndcg@10": 0.21, "test/ndcg@20": 0.26, "test/hit@10": 0.5, "test/hit@20": 0.6},
}


def _size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC) and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


@pytest.mark.parametrize("val_key", ["val/ndcg@10", None])
@pytest.mark.parametrize("selected", [None, 2])
def test_learning_curves_is_a_png(val_key, selected) -> None:
    width, height = _size(learning_curves(HISTORY, val_key=val_key, selected=selected))
    assert height > 100 and width > height  # one panel or two side by side


def test_metrics_at_k_needs_a_cut_off() -> None:
    assert metrics_at_k({"test/mrr": 0.3, "test/num_users": 9.0}) is None
    assert _size(metrics_at_k(METRICS["test"], title="test"))[0] > 100


def test_write_figures_writes_pngs_that_the_report_links(tmp_path: Path) -> None:
    figures = write_figures(tmp_path, HISTORY, METRICS, selected=3)
    assert list(figures.values()) == ["learning_curves.png", "val_metrics_at_k.png", "test_metrics_at_k.png"]
    for name in figures.values():
        _size((tmp_path / name).read_bytes())
    report = write_report(tmp_path, "exp", METRICS, {}, {}, "", figures=figures).read_text()
    for caption, name in figures.items():
        assert f"![{caption}]({name})" in report
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_history_no_learning_curve(tmp_path: Path) -> None:
    assert write_figures(tmp_path, {}, {"test": METRICS["test"]}) == {
        "test metrics at K": "test_metrics_at_k.png"
    }
