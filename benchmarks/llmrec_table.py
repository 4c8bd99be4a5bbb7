"""LightGCN vs LLMRec (and its ablations) over seeds, through the user-facing commands.

    python benchmarks/llmrec_table.py --dataset ml100k                    # seeds 2020-2022, every variant
    python benchmarks/llmrec_table.py --dataset ml1m --variants llmrec --jobs 3 \
        -- trainer.accelerator=gpu model.cuda_graph=true             # on a GPU: graphed steps

Per seed, three commands, as a user runs them:

1. ``python -m recsys.train +experiment=lightgcn_<dataset> seed=S`` -- the baseline row, and the
   base model whose top-10 non-training items are each user's pair candidates;
2. ``python -m recsys.augment ckpt_path=<its selected checkpoint>`` -- the offline provider
   (metadata templates + all-MiniLM-L6-v2 embeddings: **not an LLM**);
3. ``python -m recsys.train +experiment=llmrec_<dataset> seed=S data.augmentation_path=...`` for
   every variant.

The seed moves the split (random per-user 8:1:1), the initialisation and the batches; every run
selects its epoch on val NDCG@10 and reads test once. Each cell is the mean ± std over seeds of
the test metric. ``ndcg_ngcf`` is the NDCG of NGCF's and LLMRec's released code (ideal DCG from
the retrieved list's hits), reported beside the standard one, never instead of it.

Finished steps are reused from ``--work`` (default ``outputs/llmrec_table/<dataset>``), so an
interrupted table resumes. Nothing here is tuned on test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _bench import machine, publish  # noqa: E402
from _runs import REPO, cell, command, train  # noqa: E402

COMPAT = "evaluator.compat=[ndcg_ideal_from_retrieved]"
VARIANTS = {
    "llmrec": [],
    "no_pairs": ["model.augment_rate=0"],
    "no_features": ["model.net.feature_weight=0"],
    "no_prune": ["model.prune_rate=0"],
    "no_mae": ["model.mae_weight=0", "model.net.mask_ratio=0"],
    "code_prune": ["model.prune_rule=keep_high_loss", "model.prune_rate=0.71"],
}
COLUMNS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "ndcg_ngcf@10", "ndcg_ngcf@20"]


def augment(ckpt: str, out: Path) -> Path:
    """``recsys.augment``'s file for the base checkpoint ``ckpt`` (run it unless already there).

    The text vectors are kept in ``<work>/text_embeddings.pt``: the texts are the same on every seed.
    """
    path = out / "augmentation.pt"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        cache = f"llm.provider.encode.cache={out.parent / 'text_embeddings.pt'}"
        args = ["recsys.augment", f"ckpt_path={ckpt}", f"out={path}", cache]
        command([*args, f"paths.output_dir={out}", f"hydra.run.dir={out}"], out.parent / f"{out.name}.log")
    return path


def row(metrics: dict) -> dict[str, float]:
    test = {k.split("/", 1)[1]: v for k, v in metrics["metrics"]["test"].items()}
    return test | {
        "val ndcg@10": metrics["metrics"]["val"]["val/ndcg@10"],
        "fit s": metrics["timings_s"]["fit"],
    }


def run_seed(args: argparse.Namespace, seed: int, work: Path, jobs: int) -> dict:
    """{variant: row} for one seed: the base LightGCN, its augmentation, then the variants."""
    dataset, variants = args.dataset, args.variants
    common = [f"seed={seed}", COMPAT, *args.overrides]
    base = train(work / f"lightgcn_{seed}", [f"+experiment=lightgcn_{dataset}", *common, *args.base])
    aug = augment(base["protocol"]["selected checkpoint"], work / f"augment_{seed}")
    llmrec = [f"+experiment=llmrec_{dataset}", *common, f"data.augmentation_path={aug}"]
    with ThreadPoolExecutor(jobs) as pool:
        runs = pool.map(lambda v: train(work / f"{v}_{seed}", llmrec + VARIANTS[v]), variants)
        return {"lightgcn": row(base)} | {v: row(m) for v, m in zip(variants, runs, strict=True)}


def table(results: list[dict]) -> list[str]:
    header = ["model", "val NDCG@10", *[f"test {c}" for c in COLUMNS], "fit s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in results[0]:
        runs = [r[name] for r in results]
        cells = [cell([r["val ndcg@10"] for r in runs])] + [cell([r[c] for r in runs]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell([r['fit s'] for r in runs], 0)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml100k", "ml1m"], default="ml100k")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (seeds, then variants)")
    p.add_argument("--work", type=Path, default=None, help="run folders (reused when present)")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--base", nargs="*", default=[], help="Hydra overrides of the LightGCN runs only")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.accelerator=gpu")
    args = p.parse_args()
    work = (args.work or REPO / "outputs" / "llmrec_table" / args.dataset).resolve()
    per_seed_jobs = max(1, args.jobs // len(args.seeds))
    with ThreadPoolExecutor(min(args.jobs, len(args.seeds))) as pool:
        results = list(pool.map(lambda s: run_seed(args, s, work, per_seed_jobs), args.seeds))
    cmd = "python benchmarks/llmrec_table.py " + " ".join(sys.argv[1:])
    title = f"LLMRec vs LightGCN on {args.dataset}, {len(args.seeds)} seeds"
    text = "\n".join(
        [
            f"## {title} - {dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}. Command: `{cmd.strip()}`. "
            f"Seeds {args.seeds} (each moves the 8:1:1 split, initialisation and batches). Mean ± std over "
            "seeds; every run selected on val NDCG@10, test read once. Side information: the offline "
            "provider (metadata templates + all-MiniLM-L6-v2), **not an LLM**. ndcg_ngcf: the NDCG of "
            "LLMRec's released code (ideal DCG from the retrieved hits), shown beside the standard NDCG. "
            "Variants: " + "; ".join(f"{v}: {' '.join(o) or 'defaults'}" for v, o in VARIANTS.items()) + ".",
            "",
            *table(results),
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
