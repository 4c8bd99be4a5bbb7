"""DSL (dynamic sparse embedding training) against the dense model and static magnitude pruning.

    python benchmarks/dsl_table.py --dataset ml1m --epochs 60                          # BPR-MF
    python benchmarks/dsl_table.py --dataset gowalla --epochs 100 --jobs 12 -- trainer.accelerator=gpu

Wang et al., "Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation", WSDM 2024
(:mod:`recsys.dsl`). Per seed, through the user-facing command ``python -m recsys.train``:

1. **dense**: ``+experiment=bpr_ml1m`` (BPR-MF) or ``+experiment=lightgcn_gowalla`` (LightGCN), with
   ``trainer.max_epochs=--epochs``. Every variant trains for the same fixed budget: the DSL
   schedule spans the run, so early stopping is off (``callbacks.early_stopping=null``); ML-1M
   still selects its epoch on val NDCG@10, Gowalla (no validation split) tests its last epoch;
2. **DSL** at each density: the same plus ``+sparsity@model.sparsity=dsl model.sparsity.density=D``
   (``conf/sparsity/dsl.yaml``: uniform allocation, gradient regrowth, update every 100 steps,
   cosine-decayed update fraction from 0.3, no updates after 75% of the steps);
3. **static magnitude pruning**: the dense run's tested checkpoint with each table cut once to the
   density by |w| (:func:`recsys.dsl.prune_by_magnitude`), then tested with the same evaluator (no
   retraining).

Columns: test Recall@20 / NDCG@20 (mean ± std over seeds); the size of the embedding tables as
exported (:func:`recsys.dsl_export.export_sparse`: CSR, float32 values, uint8 columns) against dense
float32; peak training memory (``metrics.json``'s ``peak_memory_gib``: tensors allocated on the GPU,
else the process's peak resident set); and, for BPR-MF, full-sort scoring throughput of every user
from the export (:class:`recsys.dsl_export.SparseDotScorer`, item CSR x user rows) against the dense
net's ``score_all`` on the script's device. LightGCN propagates its sparse ego tables into dense
final vectors, so it scores at the dense speed once loaded; only its stored size shrinks.
Finished runs are reused from ``--work``. Nothing here is tuned on test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import machine, publish  # noqa: E402
from _runs import REPO, cell, train  # noqa: E402

EXPERIMENTS = {"ml1m": "bpr_ml1m", "gowalla": "lightgcn_gowalla"}
COLUMNS = ["recall@20", "ndcg@20"]


def overrides(args: argparse.Namespace, seed: int, density: float | None) -> list[str]:
    """The ``recsys.train`` overrides of one run (``density`` None: dense)."""
    out = [f"+experiment={EXPERIMENTS[args.dataset]}", f"seed={seed}", f"trainer.max_epochs={args.epochs}"]
    if args.dataset == "ml1m":  # lightgcn_gowalla's fixed-budget callbacks have no early stopping
        out.append("callbacks.early_stopping=null")
    if density is not None:
        out += ["+sparsity@model.sparsity=dsl", f"model.sparsity.density={density}"]
    return out + list(args.overrides)


def tested_checkpoint(metrics: dict) -> str:
    return metrics["protocol"]["selected checkpoint"]


def peak_gib(metrics: dict) -> float:
    peak = metrics.get("peak_memory_gib", {})
    return peak.get("cuda_allocated", peak.get("process_rss", float("nan")))


def test_row(metrics: dict) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in metrics["metrics"]["test"].items()}


def rebuilt(ckpt: str, device: str):
    """(datamodule, LightningModule with the checkpoint's weights, trainer) of a finished run."""
    import lightning as L

    from recsys import checkpoint

    _, datamodule, model = checkpoint.rebuild(checkpoint.load_info(ckpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return datamodule, model, trainer


def pruned_rows(ckpt: str, densities: list[float], device: str, work: Path) -> dict[float, dict]:
    """density -> test metrics and exported bytes of the checkpoint pruned once by magnitude."""
    from recsys.dsl import prune_by_magnitude
    from recsys.dsl_export import export_sparse

    out = {}
    work.mkdir(parents=True, exist_ok=True)
    datamodule, model, trainer = rebuilt(ckpt, device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for density in densities:
        model.load_state_dict(dense)  # each density prunes the dense weights afresh
        prune_by_magnitude(model.net, density)
        tables = export_sparse(model.net, work / f"pruned_{density}.pt")
        test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        out[density] = {k.split("/", 1)[1]: v for k, v in test.items()} | {
            "bytes": tables.nbytes(),
            "dense bytes": tables.dense_nbytes(),
        }
    return out


def users_per_s(score_all, num_users: int, device: str, block: int = 1024) -> float:
    """Users scored per second against every item by ``score_all`` (one warm-up block)."""
    users = torch.arange(num_users, device=device)
    score_all(users[:block])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, num_users, block):
            score_all(users[lo : lo + block])
    sync()
    return num_users / (time.perf_counter() - start)


def scoring(run_dir: Path, ckpt: str, device: str) -> dict[str, float]:
    """BPR-MF full-sort scoring from the run's export (CSR) and from its dense net: users/s."""
    from recsys.dsl_export import SparseDotScorer, SparseEmbeddingTables

    _, model, _ = rebuilt(ckpt, device)
    net = model.net.to(device).eval()
    scorer = SparseDotScorer(SparseEmbeddingTables.load(run_dir / "sparse_embeddings.pt")).to(device)
    return {
        "sparse users/s": users_per_s(scorer.score_all, net.num_users, device),
        "dense users/s": users_per_s(net.score_all, net.num_users, device),
    }


def run_seed(args: argparse.Namespace, seed: int, work: Path, pool: ThreadPoolExecutor) -> dict:
    """{variant: row} for one seed: dense, DSL at each density, static pruning of the dense run."""
    variants = {"dense": None} | {f"DSL {d:g}": d for d in args.densities}
    futures = {
        name: pool.submit(train, work / f"{name.replace(' ', '_')}_{seed}", overrides(args, seed, d))
        for name, d in variants.items()
    }
    runs = {name: f.result() for name, f in futures.items()}
    rows = {}
    for name, metrics in runs.items():
        run_dir = work / f"{name.replace(' ', '_')}_{seed}"
        row = test_row(metrics) | {"peak GiB": peak_gib(metrics), "fit s": metrics["timings_s"]["fit"]}
        export = run_dir / "sparse_embeddings.pt"
        if export.exists():
            from recsys.dsl_export import SparseEmbeddingTables

            tables = SparseEmbeddingTables.load(export)
            row |= {"bytes": tables.nbytes(), "dense bytes": tables.dense_nbytes()}
            if args.dataset == "ml1m":
                row |= scoring(run_dir, tested_checkpoint(metrics), args.device)
        rows[name] = row
    dense_ckpt = tested_checkpoint(runs["dense"])
    static = pruned_rows(dense_ckpt, args.densities, args.device, work / f"static_{seed}")
    for density, row in static.items():
        rows[f"static magnitude {density:g}"] = row
    return rows


def table(results: list[dict]) -> list[str]:
    order = list(results[0])  # dense, DSL by density, static by density
    header = [
        "model",
        *[f"test {c}" for c in COLUMNS],
        "exported MiB (x dense)",
        "peak training GiB",
        "scoring users/s (x dense)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in order:
        runs = [r[name] for r in results]
        cells = [cell([r[c] for r in runs]) for c in COLUMNS]
        if "bytes" in runs[0]:
            size = runs[0]["bytes"] / 2**20
            cells.append(f"{size:.2f} ({runs[0]['bytes'] / runs[0]['dense bytes']:.3f})")
        else:
            cells.append("dense float32")
        cells.append(cell([r["peak GiB"] for r in runs], 3) if "peak GiB" in runs[0] else "(no training)")
        if "sparse users/s" in runs[0]:
            ratio = sum(r["sparse users/s"] / r["dense users/s"] for r in runs) / len(runs)
            cells.append(f"{cell([r['sparse users/s'] for r in runs], 0)} ({ratio:.2f})")
        else:
            cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(EXPERIMENTS), default="ml1m")
    p.add_argument("--epochs", type=int, default=60, help="the fixed training budget of every run")
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.2, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, default=None, help="run folders (reused when present)")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.accelerator=gpu")
    args = p.parse_args()
    work = (args.work or REPO / "outputs" / "dsl_table" / args.dataset).resolve()
    with ThreadPoolExecutor(args.jobs) as pool, ThreadPoolExecutor(len(args.seeds)) as seeds:
        results = list(seeds.map(lambda s: run_seed(args, s, work, pool), args.seeds))
    cmd = "python benchmarks/dsl_table.py " + " ".join(sys.argv[1:])
    model = {"ml1m": "BPR-MF", "gowalla": "LightGCN"}[args.dataset]
    text = "\n".join(
        [
            f"## DSL vs dense vs static magnitude pruning, {model} on {args.dataset}, "
            f"{len(args.seeds)} seeds - {dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}, torch {torch.__version__}. "
            f"Command: `{cmd.strip()}`. Every run trains {args.epochs} epochs (no early stopping); "
            + (
                "the epoch is selected on val NDCG@10. "
                if args.dataset == "ml1m"
                else "no validation split: test at the last epoch. "
            )
            + "Mean ± std over seeds "
            f"{args.seeds}. Exported: the embedding tables as CSR (float32 values, uint8 columns, int64 row "
            "pointers), against dense float32. Peak training GiB: GPU tensors allocated during fit, "
            "else the process's peak resident set. Scoring: every user against every item, blocks of "
            f"1024, on {args.device}, from the export against the dense net.",
            "",
            *table(results),
        ]
    )
    publish(text + "\n", append=not args.no_append)


if __name__ == "__main__":
    main()
