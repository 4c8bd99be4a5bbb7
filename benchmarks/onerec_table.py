"""OneRec (sparse MoE decoder: top-k, COMET or hash gate; a dense control) against SASRec, over seeds.

    python benchmarks/onerec_table.py --dataset ml100k --jobs 2      # CPU, 3 seeds, 3 variants
    python benchmarks/onerec_table.py --dataset diginetica --jobs 2
    python benchmarks/onerec_table.py --dataset ml100k --table-only  # publish what finished
    python benchmarks/onerec_table.py --dataset ml100k --variants "OneRec, sparse MoE" \
        "OneRec, COMET gate" "OneRec, hash gate"                     # the gates (issue 12)

Every run is ``python -m recsys.train +experiment=<model>_<dataset> seed=S [overrides]``. The split
is the OneRec experiment's: ``data.horizon`` = N next items held out per sequence (MovieLens:
the last N ratings are test, the N before validation; DIGINETICA: every position of the test
sessions, with its next up-to-N clicks), no cold items; SASRec runs on exactly that split
(``data.horizon=N data.cold_share=0``) with the same session evaluator. Next-item columns rank
OneRec's one-item beam (its first generated item and the runners-up) and SASRec's full
softmax; session columns compare a list of N items (OneRec: the best beam of a session-wise
generation; SASRec: its top N next-item scores) with the next N items. Each run selects its
epoch on val NDCG@10 and reads test once.

The alignment table reads each OneRec run's ``phases.json``: validation Recall@10 and the reward
model's mean score of the generated lists at the end of pre-training and after each DPO round.
The routing table reads the last pre-training epoch there: the smallest and largest share of routed
assignments of any expert (1/E = 0.125 when balanced), starved experts and dropped assignments.
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

log = logging.getLogger("onerec_table")
NAN = float("nan")
HORIZON = {"ml100k": 5, "diginetica": 3}  # the experiments' data.horizon


def variants(dataset: str) -> dict[str, tuple[str, list[str]]]:
    n = HORIZON[dataset]
    session = (
        "+model.extra_evaluators.session={_target_:retrieval.eval.topk_evaluator.TopKEvaluator,"
        f"ks:[{n}],metrics:[hit,recall]}}"
    )
    same_split = [f"data.horizon={n}", "data.cold_share=0", "~model.extra_evaluators.cold", session]
    return {
        "SASRec (same split)": ("sasrec", same_split),
        "OneRec, sparse MoE": ("onerec", []),
        "OneRec, dense control": ("onerec", ["model.net.ffn=dense"]),
        "OneRec, COMET gate": ("onerec", ["model.net.gate=comet"]),
        "OneRec, hash gate": ("onerec", ["model.net.gate=hash", "model.net.top_k=1"]),
    }


def variants_ffn(name: str) -> str:
    """``moe`` for the OneRec variants with experts, ``dense`` for the dense control and SASRec."""
    _, overrides = variants("ml100k")[name]
    return "dense" if name.startswith("SASRec") or "model.net.ffn=dense" in overrides else "moe"


def columns(dataset: str) -> dict[str, str]:
    n = HORIZON[dataset]
    return {
        "val NDCG@10": "val/ndcg@10",
        "Recall@10": "test/recall@10",
        "NDCG@10": "test/ndcg@10",
        "Recall@20": "test/recall@20",
        f"session hit@{n}": f"test/session/hit@{n}",
        f"session recall@{n}": f"test/session/recall@{n}",
        "reward": "test/reward",
    }


def folder(work: Path, name: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return work / f"{slug}_{seed}"


def attempt(work: Path, name: str, dataset: str, seed: int, common: list[str]) -> str | None:
    """Train one run (reused when finished); the error's text if it failed, so the others go on."""
    model, overrides = variants(dataset)[name]
    try:
        train(
            folder(work, name, seed), [f"+experiment={model}_{dataset}", *overrides, f"seed={seed}", *common]
        )
    except RuntimeError as err:
        return str(err)
    return None


def finished(work: Path, name: str, seeds: list[int]) -> list[dict]:
    """metrics.json of each finished run, with its phases.json (if any) under ``"phases"``."""
    runs = []
    for s in seeds:
        out = folder(work, name, s)
        if (out / "metrics.json").exists():
            phases = out / "phases.json"
            runs.append(
                json.loads((out / "metrics.json").read_text())
                | {"phases": json.loads(phases.read_text()) if phases.exists() else {}}
            )
    return runs


def main_table(work: Path, dataset: str, names: list[str], seeds: list[int]) -> list[str]:
    cols = columns(dataset)
    header = ["model", "seeds", *cols, "selected epoch", "fit s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        runs = finished(work, name, seeds)
        if not runs:
            continue
        flat = [r["metrics"]["test"] | r["metrics"]["val"] for r in runs]
        cells = [cell([f.get(k, NAN) for f in flat]) for k in cols.values()]
        epochs = [r["protocol"]["selected epoch (0-based)"] + 1 for r in runs]
        fit = [r["timings_s"]["fit"] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {cell(epochs, 0)} | {cell(fit, 0)} |"
        )
    return lines


def alignment_table(work: Path, names: list[str], seeds: list[int]) -> list[str]:
    lines = [
        "| model | after | val Recall@10 | change | val reward | change |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in [n for n in names if n.startswith("OneRec")]:
        runs = [r for r in finished(work, name, seeds) if "pre-training" in r["phases"]]
        if not runs:
            continue
        labels = [k for k in runs[0]["phases"] if all(k in r["phases"] for r in runs)]
        base = [r["phases"]["pre-training"] for r in runs]
        for label in labels:
            now = [r["phases"][label] for r in runs]
            rec = [p.get("val/recall@10", NAN) for p in now]
            rew = [p.get("val/reward", NAN) for p in now]
            if label == "pre-training":
                lines.append(f"| {name} ({len(runs)} seeds) | {label} | {cell(rec)} | | {cell(rew)} | |")
                continue
            d_rec = [a - b.get("val/recall@10", NAN) for a, b in zip(rec, base, strict=True)]
            d_rew = [a - b.get("val/reward", NAN) for a, b in zip(rew, base, strict=True)]
            lines.append(f"| {name} | {label} | {cell(rec)} | {cell(d_rec)} | {cell(rew)} | {cell(d_rew)} |")
    return lines


def routing_table(work: Path, names: list[str], seeds: list[int]) -> list[str]:
    keys = {"min share": "moe/min_share", "max share": "moe/max_share", "starved": "moe/starved"}
    keys["dropped"] = "moe/dropped"
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in [n for n in names if variants_ffn(n) != "dense"]:
        runs = [
            r["phases"]["pre-training"] for r in finished(work, name, seeds) if "pre-training" in r["phases"]
        ]
        if runs:
            lines.append(
                f"| {name} | " + " | ".join(cell([r.get(k, NAN) for r in runs]) for k in keys.values()) + " |"
            )
    return lines


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(HORIZON), default="ml100k")
    p.add_argument("--variants", nargs="+", default=None, help="subset of the variants (default: all)")
    add_table_arguments(p)
    args = p.parse_args()
    names = args.variants or list(variants(args.dataset))
    work = (args.work or REPO / "outputs" / "onerec_table" / args.dataset).resolve()
    if not args.table_only:
        order = [(n, s) for s in args.seeds for n in names]
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = pool.map(lambda r: attempt(work, r[0], args.dataset, r[1], args.overrides), order)
            for error in [e for e in runs if e]:
                log.error("%s", error)
    cmd = "python benchmarks/onerec_table.py " + " ".join(sys.argv[1:])
    described = "; ".join(
        f"{n}: `{m}_{args.dataset} {' '.join(o)}`" for n, (m, o) in variants(args.dataset).items()
    )
    text = "\n".join(
        [
            f"## OneRec vs SASRec on {args.dataset}, {len(args.seeds)} seeds - "
            f"{dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}. Command: `{cmd.strip()}`. "
            f"Seeds {args.seeds}. Mean ± std over the seeds finished (column 'seeds'); every run selected on "
            f"val NDCG@10, test read once; N = {HORIZON[args.dataset]} next items held out. "
            f"Runs: {described}.",
            "",
            *main_table(work, args.dataset, names, args.seeds),
            "",
            "Preference alignment (validation, per phase; change = against the end of pre-training):",
            "",
            *alignment_table(work, names, args.seeds),
            "",
            "Expert routing at the last pre-training epoch (shares of processed assignments):",
            "",
            *routing_table(work, names, args.seeds),
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
