"""Two-tower retrieval with and without feature-masking self-supervision, over seeds and alphas.

    python benchmarks/two_tower_table.py                                    # CPU: hours on ML-1M
    python benchmarks/two_tower_table.py --jobs 6 -- trainer.accelerator=gpu  # on a GPU
    python benchmarks/two_tower_table.py --table-only                       # publish what finished

Yao et al., "Self-supervised Learning for Large-scale Item Recommendations", CIKM 2021: the
main in-batch softmax (logQ-corrected) alone, and plus alpha times the InfoNCE between two
masked views of the item features, with random (RFM) or correlated (CFM) feature masking.
Every run is ``python -m recsys.train +experiment=two_tower_ml1m`` (or ``..._ssl_rfm_ml1m`` /
``..._ssl_cfm_ml1m``) with ``seed=S model.ssl_weight=A``: the seed moves the random per-user
8:1:1 split, the initialisation and the batches; each run selects its epoch on val NDCG@50 and
reads test once. The tail columns rank every item as usual and count only targets among the
least popular items that together hold 20% of the training positives (``data.tail_share``).

Runs are scheduled no-SSL, RFM and CFM at the first alpha first (every seed), then the other
alphas, so an interrupted table still has the main comparison; finished runs are reused from
``--work`` and ``--table-only`` publishes whatever has finished (the seed count is in each row).
Nothing here is tuned on test: the alpha picked per masking is the best on validation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _bench import machine, publish  # noqa: E402
from _runs import REPO, add_table_arguments, cell, train  # noqa: E402

log = logging.getLogger("two_tower_table")
EXPERIMENTS = {"none": "two_tower_ml1m", "rfm": "two_tower_ssl_rfm_ml1m", "cfm": "two_tower_ssl_cfm_ml1m"}
COLUMNS = {
    "val NDCG@50": "val/ndcg@50",
    "test Recall@50": "test/recall@50",
    "test NDCG@50": "test/ndcg@50",
    "tail Recall@50": "test/tail/recall@50",
    "tail NDCG@50": "test/tail/ndcg@50",
    "test NDCG@10": "test/ndcg@10",
}


def variants(alphas: list[float], maskings: list[str]) -> list[tuple[str, list[str]]]:
    """(name, overrides) in scheduling order: no SSL, then the maskings alpha by alpha."""
    out = [("no SSL", [f"+experiment={EXPERIMENTS['none']}"])]
    for alpha in alphas:
        for masking in maskings:
            name = f"{masking.upper()} α={alpha:g}"
            out.append((name, [f"+experiment={EXPERIMENTS[masking]}", f"model.ssl_weight={alpha}"]))
    return out


def attempt(work: Path, name: str, overrides: list[str], seed: int, common: list[str]) -> str | None:
    """Train one run (reused when finished); the error's text if it failed, so the others go on."""
    try:
        train(folder(work, name, seed), [*overrides, f"seed={seed}", *common])
    except RuntimeError as err:
        return str(err)
    return None


def folder(work: Path, name: str, seed: int) -> Path:
    return work / f"{name.replace(' ', '_').replace('α=', 'a')}_{seed}"


def read(metrics: dict) -> dict[str, float]:
    flat = metrics["metrics"]["test"] | metrics["metrics"]["val"]
    row = {column: flat[key] for column, key in COLUMNS.items()}
    return row | {
        "epochs": metrics["protocol"]["selected epoch (0-based)"] + 1,
        "fit s": metrics["timings_s"]["fit"],
    }


def finished(work: Path, name: str, seeds: list[int]) -> list[dict[str, float]]:
    paths = [folder(work, name, s) / "metrics.json" for s in seeds]
    return [read(json.loads(p.read_text())) for p in paths if p.exists()]


def table(work: Path, names: list[str], seeds: list[int]) -> list[str]:
    header = ["model", "seeds", *COLUMNS, "selected epoch", "fit s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        runs = finished(work, name, seeds)
        if not runs:
            continue
        cells = [cell([r[c] for r in runs]) for c in COLUMNS]
        epochs = cell([r["epochs"] for r in runs], 0)
        lines.append(
            f"| {name} | {len(runs)} | "
            + " | ".join(cells)
            + f" | {epochs} | {cell([r['fit s'] for r in runs], 0)} |"
        )
    return lines


def best_on_validation(work: Path, names: list[str], seeds: list[int]) -> list[str]:
    """Per masking, the alpha with the best mean val NDCG@50 (over the seeds finished for every alpha)."""
    lines = []
    for masking in ("RFM", "CFM"):
        scored = {
            n: statistics.mean(r["val NDCG@50"] for r in finished(work, n, seeds))
            for n in names
            if n.startswith(masking) and finished(work, n, seeds)
        }
        if scored:
            pick = max(scored, key=scored.get)
            lines.append(f"- {masking}: {pick} has the best mean val NDCG@50 ({scored[pick]:.4f}).")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    p.add_argument("--maskings", nargs="+", default=["rfm", "cfm"], choices=["rfm", "cfm"])
    add_table_arguments(p)
    args = p.parse_args()
    work = (args.work or REPO / "outputs" / "two_tower_table").resolve()
    plan = variants(args.alphas, args.maskings)
    if not args.table_only:
        first = 1 + len(args.maskings)  # no SSL and each masking at the first alpha
        order = [(n, o, s) for n, o in plan[:first] for s in args.seeds]
        order += [(n, o, s) for n, o in plan[first:] for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [e for e in pool.map(lambda r: attempt(work, *r, args.overrides), order) if e]
        for error in failed:
            log.error("%s", error)
    names = [n for n, _ in plan]
    now = dt.datetime.now()
    cmd = "python benchmarks/two_tower_table.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"## Two-tower SSL on ml1m (feature masking), {len(args.seeds)} seeds - {now:%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}. Command: `{cmd.strip()}`. "
            f"Seeds {args.seeds} (each moves the 8:1:1 split, initialisation and batches). Mean ± std over "
            "the seeds finished (column 'seeds'); every run selected on val NDCG@50, test read once. "
            "Positives: ratings >= 4; towers over user gender/age/occupation/zip prefix and item "
            "genres/title words/year, plus the id field. Tail: test targets among the least popular items "
            "holding 20% of the training positives, ranked against all items. SSL items drawn uniformly; "
            "masks per example.",
            "",
            *table(work, names, args.seeds),
            "",
            *best_on_validation(work, names, args.seeds),
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
