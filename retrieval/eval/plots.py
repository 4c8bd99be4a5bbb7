"""Figures for run reports: learning curves and metric@K, as PNG files.

Drawn on matplotlib's Agg canvas (no display, no global ``pyplot`` state) and written
atomically like the reports themselves (temp file, then rename).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from retrieval.eval.report import atomic_write_bytes

History = Mapping[int, Mapping[str, float]]  # {epoch: {"train/loss": 0.69, "val/ndcg@10": 0.21, ...}}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def learning_curves(
    history: History, val_key: str | None = "val/ndcg@10", selected: int | None = None
) -> bytes:
    """Train loss (left) and ``val_key`` (right) per epoch, as PNG bytes.

    Args:
        history: per-epoch values; epochs missing a key are skipped in that panel.
        val_key: the validation metric to draw (the model-selection metric); ``None``: train
            loss only (runs without validation).
        selected: epoch of the selected checkpoint, marked with a dashed line.
    """
    keys = ["train/loss"] + ([val_key] if val_key else [])
    fig = Figure(figsize=(4.5 * len(keys), 3.5), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        points = sorted((e, row[key]) for e, row in history.items() if key in row)
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3)
        if selected is not None and selected >= 0:
            ax.axvline(
                selected, color="grey", linestyle="--", linewidth=1, label=f"selected (epoch {selected})"
            )
            ax.legend(loc="best", fontsize="small")
        ax.set(xlabel="epoch (0-based)", ylabel=key, title=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _png(fig)


def metrics_at_k(metrics: Mapping[str, float], title: str = "") -> bytes | None:
    """One line per metric family (``ndcg``, ``recall``, ...) over its cut-offs K, as PNG bytes.

    Args:
        metrics: flat ``{"test/ndcg@10": 0.3, "test/ndcg@20": 0.33, ...}``; keys without ``@K``
            are left out; a protocol segment stays in the family (``test/mar/dcg@5``: ``mar/dcg``).
        title: figure title.

    Returns:
        The PNG, or ``None`` when no key has a cut-off.
    """
    families: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r"(?:[^/]+/)?(.+)@(\d+)", key)  # "test/mar/dcg@5": family "mar/dcg"
        if m:
            families.setdefault(m.group(1), []).append((int(m.group(2)), float(value)))
    if not families:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, points in sorted(families.items()):
        points.sort()
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
    ks = sorted({k for points in families.values() for k, _ in points})
    ax.set_xticks(ks)
    ax.set(xlabel="K", ylabel="value", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return _png(fig)


def write_figures(
    out_dir: str | Path,
    history: History,
    metrics: Mapping[str, Mapping[str, float]],
    val_key: str | None = "val/ndcg@10",
    selected: int | None = None,
) -> dict[str, str]:
    """Write ``learning_curves.png`` and ``<stage>_metrics_at_k.png`` into ``out_dir``.

    Args:
        out_dir: the run's folder (next to ``report.md``).
        history: per-epoch values (no learning-curve figure when empty).
        metrics: ``{stage: {metric: value}}`` as in the report; one metric@K figure per stage.
        val_key: validation metric of the learning curve (``None``: none).
        selected: epoch of the selected checkpoint.

    Returns:
        ``{caption: file name}`` for :func:`~retrieval.eval.report.write_report`.
    """
    out_dir = Path(out_dir)
    figures: dict[str, str] = {}
    if history:
        atomic_write_bytes(out_dir / "learning_curves.png", learning_curves(history, val_key, selected))
        figures["train loss" + (f" and {val_key}" if val_key else "") + " per epoch"] = "learning_curves.png"
    for stage, values in metrics.items():
        png = metrics_at_k(values, title=f"{stage} metrics at K")
        if png is not None:
            name = f"{stage}_metrics_at_k.png"
            atomic_write_bytes(out_dir / name, png)
            figures[f"{stage} metrics at K"] = name
    return figures
