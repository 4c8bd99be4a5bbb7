"""Run reports: ``metrics.json`` (machine-readable) and ``report.md`` (for people).

Both files are written to a temp file and renamed into place, so a crashed run never
leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _atomic_write(path: str | Path, data: str | bytes, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    _atomic_write(path, data, "wb")


def _column_key(name: str) -> tuple[str, int]:
    """Sort key of a metric column: by name, then cut-off (``"mrr"`` sorts as cut-off 0)."""
    m = re.fullmatch(r"(.+)@(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def _without_stage(key: str) -> str:
    """``"val/mar/dcg@5"`` -> ``"mar/dcg@5"``; ``"ndcg@10"`` stays."""
    return key.split("/", 1)[1] if "/" in key else key


def metrics_table(metrics: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A Markdown table: one row per stage, one column per metric (``ndcg@10``, ``mrr``, ...).

    Args:
        metrics: ``{stage: {"val/ndcg@10": 0.31, ...}}``; stage prefixes in keys are dropped (a
            protocol segment stays: ``val/mar/dcg@5`` is column ``mar/dcg@5``); counts such as
            ``num_users`` are left out.
        digits: decimals shown.
    """
    columns: list[str] = []
    for values in metrics.values():
        for key in values:
            name = _without_stage(key)
            if name not in columns and not name.split("/")[-1].startswith("num_"):
                columns.append(name)
    columns.sort(key=_column_key)
    lines = ["| stage | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for stage, values in metrics.items():
        flat = {_without_stage(k): v for k, v in values.items()}
        cells = [f"{flat[c]:.{digits}f}" if c in flat else "" for c in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    title: str,
    metrics: Mapping[str, Mapping[str, float]],
    protocol: Mapping[str, object],
    timings: Mapping[str, float],
    config_yaml: str,
    figures: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``out_dir``.

    Args:
        out_dir: the run's folder.
        title: report heading (e.g. the experiment name).
        metrics: ``{stage: {metric: value}}`` for "val" (of the selected model) and "test".
        protocol: what a reader needs to compare numbers: dataset, split, candidates,
            metric convention, compatibility modes in use, selection rule.
        timings: seconds per phase (``fit``, ``test``, ...).
        config_yaml: the fully resolved config.
        figures: ``{caption: file name}`` of images already written into ``out_dir``
            (see :mod:`retrieval.eval.plots`), linked from a "Figures" section.
        extra: more entries for ``metrics.json`` (e.g. the per-epoch ``history``).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    payload = {
        "title": title,
        "metrics": metrics,
        "protocol": protocol,
        "timings_s": timings,
        **(extra or {}),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    parts = [
        f"# {title}",
        "",
        "## Results",
        "",
        metrics_table(metrics),
        "",
        "## Protocol",
        "",
        *[f"- **{k}**: {v}" for k, v in protocol.items()],
        "",
        *(["## Figures", "", *[f"![{c}]({f})\n" for c, f in figures.items()]] if figures else []),
        "## Time",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in timings.items()],
        "",
        "## Config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report
