"""Coat: MF vs Rel-MF vs BPR-MF over seeds, both protocols, through ``python -m recsys.train``.

    python benchmarks/coat_table.py                         # every variant, seeds 1..5
    python benchmarks/coat_table.py --variants mf relmf --seeds 1 2 --jobs 2

Each cell is the mean ± standard deviation over seeds of the test metric of one run of the
user-facing command (the seed moves the MAR validation/test split, the initialisation and the
batches); every run selects its epoch on ``val/mar/dcg@5`` and reads test once. Variants:

* ``mf``: ``+experiment=mf_coat`` (pointwise log loss, propensity 1: the naive estimator);
* ``relmf``: ``+experiment=relmf_coat`` (item popularity^0.5, unclipped);
* ``relmf_clip``: the same, propensities clipped at 0.25 (on Coat the smallest popularity
  propensity of a clicked item is 1/7, so a clip at 0.1 changes nothing; 0.25 binds on the
  items with fewer than 4 clicks);
* ``relmf_shipped``: Coat's own learned propensities (Schnabel et al.);
* ``relmf_squared``: popularity^0.5, the released code's squared loss;
* ``bpr``: ``+experiment=bpr_coat``.

Nothing here is tuned: every variant uses its experiment's defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _bench import cpu_model, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "mf": ["+experiment=mf_coat"],
    "relmf": ["+experiment=relmf_coat"],
    "relmf_clip": ["+experiment=relmf_coat", "data.propensity.clip=0.25"],
    "relmf_shipped": ["+experiment=relmf_coat", "propensity@data.propensity=shipped"],
    "relmf_squared": ["+experiment=relmf_coat", "model.net.loss=squared"],
    "bpr": ["+experiment=bpr_coat"],
}
COLUMNS = [
    "mar/dcg@1",
    "mar/dcg@3",
    "mar/dcg@5",
    "mar/recall@3",
    "mar/map@3",
    "mar/map@5",
    "ndcg@5",
    "ndcg@10",
    "recall@5",
    "recall@10",
]


def run_one(variant: str, seed: int, out_root: Path) -> dict[str, float]:
    """Test metrics (without the stage prefix) of one training run."""
    out = out_root / f"{variant}_{seed}"
    cmd = [
        sys.executable,
        "-m",
        "recsys.train",
        *VARIANTS[variant],
        f"seed={seed}",
        f"paths.output_dir={out}",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=" + str(out),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {k.split("/", 1)[1]: v for k, v in metrics["test"].items()} | {
        "val " + k.split("/", 1)[1]: v for k, v in metrics["val"].items()
    }


def cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(v, s) for v in args.variants for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda job: run_one(*job, Path(tmp)), jobs))
    by_variant: dict[str, list[dict[str, float]]] = {}
    for (variant, _), metrics in zip(jobs, results, strict=True):
        by_variant.setdefault(variant, []).append(metrics)
    header = ["variant", "val mar/dcg@5", *[f"test {c}" for c in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant, runs in by_variant.items():
        cells = [cell([r["val mar/dcg@5"] for r in runs])] + [cell([r[c] for r in runs]) for c in COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    command = "python benchmarks/coat_table.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"## Coat: MF vs Rel-MF vs BPR-MF, {len(args.seeds)} seeds - {dt.date.today()}",
            "",
            f"Machine: {cpu_model()}; Python {platform.python_version()}. Command: `{command.strip()}`. "
            "Mean ± std over seeds (seeds move the MAR val/test split and the initialisation); each run "
            "selected on val/mar/dcg@5. mar/: each user's 8 test MAR items ranked (the paper's protocol); "
            "others: full ranking over 300 items minus the user's MNAR-rated ones.",
            "",
            *lines,
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
