"""Serving a trained recommender through faiss: IVF against Flat (recall, test metrics, latency).

    python benchmarks/item_index.py outputs/two_tower_ml1m/<run>/checkpoints/last.ckpt
    python benchmarks/item_index.py CKPT --nlist 256 --nprobe 1,4,16,64 --k 50 --no-append

For the checkpoint's item embeddings (:mod:`recsys.serving`), a ``Flat`` (exact) and an
``IVF{nlist},Flat`` index (nlist default: 4 * sqrt(items), rounded) are built in a temporary
folder. Every test user (``|T_u| > 0``) is ranked with the test protocol's candidates (all items
minus training and validation items), top ``K`` (default 50):

* ``full sort``: the harness's ranking (:func:`retrieval.eval.topk.full_sort_topk`), the reference;
* ``Flat``: through the Flat index (``k + m`` items per user, ``m >= |excluded|``, filtered);
* ``IVF`` at each ``nprobe``.

Columns: recall of the list against the Flat list (|IVF top-K ∩ Flat top-K| / |Flat top-K|,
mean over users); test Recall@K and NDCG@K through the harness (``hit_matrix`` +
``compute_metrics``); single-query latency, one user per call, as the median over
``--single-users`` users of one :func:`recsys.serving.rank` call (faiss search + filtering) and of
the faiss search alone; batched throughput, every test user in one :func:`~recsys.serving.rank`
call (best of ``--repeats``). faiss and torch run ``--threads`` threads each (default 1): with both
OpenMP pools busy in one process, the idle pool's spin-waiting slowed the 2-thread batched Flat
ranking 15x on a 2-core machine (0.95 s against 0.06 s; ``OMP_WAIT_POLICY=PASSIVE`` also fixes it).
The machine's load average is reported beside the timings.

The table is printed and appended, with the date, machine and command, to ``benchmarks/RESULTS.md``
(``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import cpu_model, publish  # noqa: E402

from recsys import serving  # noqa: E402
from retrieval.eval.topk_evaluator import TopKEvaluator  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a Sparrow training checkpoint of a dot-product recommender")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: round(4 * sqrt(items)))")
    p.add_argument("--nprobe", default="1,2,4,8,16,32", help="comma-separated nprobe values")
    p.add_argument("--k", type=int, default=50, help="list length K (recall and metrics at K)")
    p.add_argument("--single-users", type=int, default=300, help="users timed one query at a time")
    p.add_argument("--repeats", type=int, default=5, help="batched timings: best of this many")
    p.add_argument("--threads", type=int, default=1, help="faiss and torch threads (0: leave their defaults)")
    p.add_argument("--data-dir", default=None, help="datasets root (default: the run's / $SPARROW_DATA_DIR)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args(argv)


def batched(fn, repeats: int) -> tuple[float, tuple]:
    """(best wall seconds of ``fn()`` over ``repeats`` runs after one warm-up, its result)."""
    result = fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def single_query_ms(served, users: torch.Tensor, k: int, exclude, searcher) -> tuple[float, float]:
    """Median ms per user of one ``rank`` call, and of its faiss search alone (``nan`` for full sort)."""
    whole, search = [], []
    n_excl = exclude.sizes()
    for u in users.tolist():
        one = torch.tensor([u])
        start = time.perf_counter()
        serving.rank(served, one, k, exclude, searcher)
        whole.append(time.perf_counter() - start)
        if searcher is not None:
            kq = min(k + (1 << int(n_excl[u]).bit_length()) - 1, searcher.index.ntotal)
            query = served.user_emb[one].numpy()
            start = time.perf_counter()
            searcher.index.search(query, kq)
            search.append(time.perf_counter() - start)
    return 1e3 * float(np.median(whole)), (1e3 * float(np.median(search)) if search else math.nan)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    nprobes = [int(p) for p in args.nprobe.split(",")]
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    served = serving.load_recommender(args.ckpt, args.data_dir)
    n_items = served.item_emb.shape[0]
    nlist = args.nlist or round(4 * math.sqrt(n_items))
    dm = served.datamodule
    targets, exclude = dm.targets("test"), dm.exclude("test")
    users = torch.nonzero(targets.sizes() > 0).squeeze(1)  # (U,)
    single = users[torch.randperm(users.numel(), generator=torch.Generator().manual_seed(0))][
        : args.single_users
    ]
    evaluator = TopKEvaluator(ks=(args.k,), metrics=("recall", "ndcg"))
    rows = []

    def measure(label: str, nprobe: str, searcher, reference: torch.Tensor | None) -> torch.Tensor:
        seconds, (_, items) = batched(
            lambda: serving.rank(served, users, args.k, exclude, searcher), args.repeats
        )
        metrics = serving.list_metrics(users, items, targets, evaluator)
        one_ms, search_ms = single_query_ms(served, single, args.k, exclude, searcher)
        rows.append(
            (
                label,
                nprobe,
                serving.recall_against(reference, items) if reference is not None else 1.0,
                metrics[f"recall@{args.k}"],
                metrics[f"ndcg@{args.k}"],
                one_ms,
                search_ms,
                users.numel() / seconds,
            )
        )
        return items

    with tempfile.TemporaryDirectory(prefix="item_index_") as tmp:
        build = {}
        for name, factory in (("flat", "Flat"), ("ivf", f"IVF{nlist},Flat")):
            start = time.perf_counter()
            serving.export_item_index(served, Path(tmp) / name, factory=factory)
            build[name] = time.perf_counter() - start
        full = measure("full sort (harness)", "-", None, None)
        flat_searcher = serving.open_item_index(Path(tmp) / "flat", served)
        flat = measure("Flat", "-", flat_searcher, None)
        same = int((flat == full).all(1).sum())
        rows[0] = (rows[0][0], rows[0][1], serving.recall_against(flat, full), *rows[0][3:])
        for nprobe in nprobes:
            if nprobe > nlist:
                continue
            searcher = serving.open_item_index(Path(tmp) / "ivf", served, nprobe=nprobe)
            measure(f"IVF{nlist},Flat", str(nprobe), searcher, flat)

    k = args.k
    header = (
        f"| index | nprobe | recall@{k} vs Flat | test Recall@{k} | test NDCG@{k} | "
        "single query ms (rank) | single query ms (faiss) | batched users/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.3f} | "
        + ("-" if math.isnan(r[6]) else f"{r[6]:.3f}")
        + f" | {r[7]:,.0f} |"
        for r in rows
    ]
    fp = served.fingerprint
    when = dt.datetime.now().isoformat(timespec="minutes")
    command = "python benchmarks/item_index.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(
        [
            f"## Item index (faiss Flat vs IVF) for {served.name}, {fp.dataset} - {when}",
            "",
            f"Machine: {cpu_model()}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} "
            f"OpenMP threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); load average "
            f"{os.getloadavg()[0]:.1f} at the end. Command: `{command}`. Checkpoint {args.ckpt} "
            f"({fp.model}, epoch {served.epoch}): {fp.num_users} users, {n_items} items, "
            f"d={served.item_emb.shape[1]}. "
            f"Test protocol: {users.numel()} users with test items, candidates = all items minus training "
            f"and validation items, K={k}. Build: Flat {build['flat']:.2f} s, IVF{nlist},Flat "
            f"{build['ivf']:.2f} s (k-means, seed 0). Flat lists identical to the full sort's for {same} "
            f"of {users.numel()} users. Single query: median over {single.numel()} random test users of "
            "one call (rank = faiss search of k + m items, m >= |excluded|, plus filtering; faiss = the "
            "search alone). Batched: all test users in one call, best of "
            f"{args.repeats}.",
            "",
            header,
            *lines,
        ]
    )
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
