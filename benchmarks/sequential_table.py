"""SASRec vs M2TRec (and its ablations) on sequences, over seeds, overall and on cold items.

    python benchmarks/sequential_table.py --dataset ml100k            # CPU, 3 seeds, every variant
    python benchmarks/sequential_table.py --dataset diginetica --jobs 2
    python benchmarks/sequential_table.py --dataset ml100k --table-only   # publish what finished

Every run is ``python -m recsys.train +experiment=<model>_<dataset> seed=S [overrides]``: the seed
moves the held-out cold items, the initialisation and the batches (the leave-one-out and the
session-time splits do not depend on it). Each run selects its epoch on val NDCG@10 and reads
test once. ``cold`` columns count only test rows whose target is an item held out of training
(``data.cold_share``); SASRec has never trained those items' vectors, so its numbers there are
the floor the metadata has to beat. Training throughput is the mean of the runs' training
sequences per second over their fit time (validation included).

Finished runs are reused from ``--work`` (default ``outputs/sequential_table/<dataset>``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _bench import machine, publish  # noqa: E402
from _runs import REPO, add_table_arguments, cell, train  # noqa: E402

log = logging.getLogger("sequential_table")
VARIANTS = {
    "SASRec": ("sasrec", []),
    "M2TRec": ("m2trec", []),
    "M2TRec, no category task": ("m2trec", ["model.category_weight=0"]),
    "M2TRec + item ids (hybrid)": ("m2trec", ["model.net.use_item_ids=true"]),
}
COLUMNS = {
    "val NDCG@10": "val/ndcg@10",
    "Recall@10": "test/recall@10",
    "Recall@20": "test/recall@20",
    "NDCG@10": "test/ndcg@10",
    "NDCG@20": "test/ndcg@20",
    "MRR@20": "test/mrr@20",
    "cold Recall@20": "test/cold/recall@20",
    "cold NDCG@20": "test/cold/ndcg@20",
    "cold MRR@20": "test/cold/mrr@20",
}


def folder(work: Path, name: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return work / f"{slug}_{seed}"


def attempt(work: Path, name: str, dataset: str, seed: int, common: list[str]) -> str | None:
    """Train one run (reused when finished); the error's text if it failed, so the others go on."""
    model, overrides = VARIANTS[name]
    try:
        args = [f"+experiment={model}_{dataset}", *overrides, f"seed={seed}", *common]
        train(folder(work, name, seed), args)
    except RuntimeError as err:
        return str(err)
    return None


def read(metrics: dict) -> dict[str, float]:
    flat = metrics["metrics"]["test"] | metrics["metrics"]["val"]
    row = {column: flat.get(key, float("nan")) for column, key in COLUMNS.items()}
    return row | {
        "epochs": metrics["protocol"]["selected epoch (0-based)"] + 1,
        "fit s": metrics["timings_s"]["fit"],
    }


def table(work: Path, names: list[str], seeds: list[int]) -> list[str]:
    header = ["model", "seeds", *COLUMNS, "selected epoch", "fit s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        paths = [folder(work, name, s) / "metrics.json" for s in seeds]
        runs = [read(json.loads(p.read_text())) for p in paths if p.exists()]
        if not runs:
            continue
        cells = [cell([r[c] for r in runs]) for c in COLUMNS]
        lines.append(
            f"| {name} | {len(runs)} | "
            + " | ".join(cells)
            + f" | {cell([r['epochs'] for r in runs], 0)} | {cell([r['fit s'] for r in runs], 0)} |"
        )
    return lines


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml100k", "diginetica"], default="ml100k")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_table_arguments(p)
    args = p.parse_args()
    work = (args.work or REPO / "outputs" / "sequential_table" / args.dataset).resolve()
    if not args.table_only:
        order = [(n, s) for s in args.seeds for n in args.variants]
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = pool.map(lambda r: attempt(work, r[0], args.dataset, r[1], args.overrides), order)
            for error in [e for e in runs if e]:
                log.error("%s", error)
    cmd = "python benchmarks/sequential_table.py " + " ".join(sys.argv[1:])
    variants = "; ".join(f"{n}: `{m}_{args.dataset} {' '.join(o)}`" for n, (m, o) in VARIANTS.items())
    text = "\n".join(
        [
            f"## Sequential recommenders on {args.dataset}, {len(args.seeds)} seeds - "
            f"{dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}. Command: `{cmd.strip()}`. "
            f"Seeds {args.seeds} (each moves the cold items, initialisation and batches). Mean ± std over "
            "the seeds finished (column 'seeds'); every run selected on val NDCG@10, test read once; "
            "every item ranked, histories not masked. cold: test rows whose target was held out of "
            "training. Experiments: " + variants + ".",
            "",
            *table(work, args.variants, args.seeds),
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
