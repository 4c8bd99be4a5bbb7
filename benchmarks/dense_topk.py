"""Fused dense scoring + masking + top-k against plain torch (matmul + mask + topk): time and peak memory.

    python benchmarks/dense_topk.py --device cuda                      # both cases, appends to RESULTS.md
    python benchmarks/dense_topk.py --device cpu --scale 0.02 --no-append   # a small smoke run

Cases (fixed seed 0, random normal embeddings, d = 64):

* ``gowalla``: 29,858 users x 40,981 items (Gowalla as in NGCF/LightGCN), K = 20, 27 random
  training items per user masked (about Gowalla's 810k training pairs);
* ``catalogue_1m``: 10,000 queries x 1,000,000 items (dense retrieval over a 1M catalogue),
  K = 100, nothing masked.

Variants, each timed in the same run (best of ``--repeats`` after one warm-up, CUDA synchronised):

* ``fused``: :func:`retrieval.kernels.dense_topk.dense_topk` (the Triton kernel on CUDA, the torch
  reference on CPU), float32 and bfloat16 embeddings;
* ``torch`` (the baseline): per block of ``--baseline-chunk`` users, ``q @ E.T`` (float32), the
  block's training pairs set to ``-inf``, ``torch.topk`` (ties in unspecified order);
* ``harness``: :func:`retrieval.eval.topk.full_sort_topk` (what the evaluator runs without the
  kernel: the same blocks plus the exact id tie-break).

Peak memory is ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call
(embeddings and exclusion sets), on CUDA; the process's peak RSS on CPU. "top-K vs harness" counts
the rows whose ids differ from the exact harness lists (float32 only: bfloat16 scores differ).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import cpu_model, publish  # noqa: E402

from retrieval.eval.topk import full_sort_topk  # noqa: E402
from retrieval.kernels.dense_topk import dense_topk  # noqa: E402
from retrieval.types import ItemSets  # noqa: E402

CASES = {  # name -> (queries, items, K, masked items per query)
    "gowalla": (29_858, 40_981, 20, 27),
    "catalogue_1m": (10_000, 1_000_000, 100, 0),
}
Result = tuple[torch.Tensor, torch.Tensor]


def make_case(users: int, items: int, dim: int, masked: int, device: str) -> tuple:
    """Seeded embeddings (on ``device``) and ``masked`` random items per user (or ``None``)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(users, dim, generator=g).to(device)  # (U, d)
    e = torch.randn(items, dim, generator=g).to(device)  # (N, d)
    if not masked:
        return q, e, None
    pu = torch.arange(users).repeat_interleave(masked)
    pi = torch.randint(0, items, (users * masked,), generator=g)
    return q, e, ItemSets.from_pairs(pu, pi, users, items).to(device)


def torch_baseline(q: torch.Tensor, e: torch.Tensor, k: int, exclude: ItemSets | None, chunk: int) -> Result:
    """Plain torch per block of users: matmul, training pairs to -inf, ``torch.topk``."""
    vals, ids = [], []
    for start in range(0, q.shape[0], chunk):
        users = torch.arange(start, min(start + chunk, q.shape[0]), device=q.device)  # (b,)
        scores = q[users] @ e.T  # (b, N)
        if exclude is not None:
            row, item = exclude.rows(users)
            scores[row, item] = float("-inf")
        v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # (b, K)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)


def harness(q: torch.Tensor, e: torch.Tensor, k: int, exclude: ItemSets | None, chunk: int) -> Result:
    """:func:`full_sort_topk` on the dot-product scores: the evaluator's path without the kernel."""
    users = torch.arange(q.shape[0], device=q.device)
    return full_sort_topk(
        lambda u: q[u] @ e.T, users, k, exclude=exclude, chunk_size=chunk, progress=False, out_device=None
    )


def measure(fn: Callable[[], Result], device: str, repeats: int) -> tuple[float, float, Result]:
    """(best seconds, peak extra MiB, result) of ``fn`` after one warm-up."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # whole process
    return best, peak, out


def rows_differ(got: Result, want: Result) -> str:
    """How many rows' id lists differ from ``want`` (and whether only near-equal scores explain it)."""
    n = int((got[1].cpu() != want[1].cpu()).any(1).sum())
    if n == 0:
        return "identical"
    gap = (got[0].cpu() - want[0].cpu()).abs().max().item()
    return f"{n:,} rows differ (max score gap {gap:.1e})"


def run_case(name: str, args: argparse.Namespace) -> list[str]:
    users, items, k, masked = CASES[name]
    users, items = max(1, round(users * args.scale)), max(1, round(items * args.scale))
    q, e, excl = make_case(users, items, args.dim, masked, args.device)
    variants: dict[str, Callable[[], Result]] = {
        "torch: matmul + mask + topk (baseline)": lambda: torch_baseline(q, e, k, excl, args.baseline_chunk),
        "harness: full_sort_topk (exact ties)": lambda: harness(q, e, k, excl, args.baseline_chunk),
        "fused: dense_topk, float32": lambda: dense_topk(q, e, k, excl),
        "fused: dense_topk, bfloat16": lambda: dense_topk(q.bfloat16(), e.bfloat16(), k, excl),
    }
    measured = {label: measure(fn, args.device, args.repeats) for label, fn in variants.items()}
    base_t, base_m, _ = measured["torch: matmul + mask + topk (baseline)"]
    exact = measured["harness: full_sort_topk (exact ties)"][2]
    pairs = excl.indices.numel() if excl is not None else 0
    lines = [
        f"### {name}: {users:,} queries x {items:,} items, d = {args.dim}, K = {k}, {pairs:,} masked pairs",
        "",
        "| variant | time ms | peak extra MiB | time / baseline | memory / baseline | top-K vs harness |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, (t, m, out) in measured.items():
        same = "n/a (bfloat16 scores)" if "bfloat16" in label else rows_differ(out, exact)
        ratios = f"{t / base_t:.2f}x | {m / max(base_m, 1e-9):.3f}x"
        lines.append(f"| {label} | {t * 1e3:,.1f} | {m:,.0f} | {ratios} | {same} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the kernel) or cpu (the torch reference)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every case's queries and items")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--baseline-chunk", type=int, default=4096, help="users per block of the torch paths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"{cpu_model()}, {torch.get_num_threads()} threads"
    lines = [
        f"## Fused dense top-k vs matmul + mask + topk ({args.device}) - {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Machine: {machine}; Python {platform.python_version()}, torch {torch.__version__}"
        + (f", triton {__import__('triton').__version__}" if cuda else "")
        + f". Best of {args.repeats} after a warm-up; peak memory "
        + ("= max_memory_allocated beyond the inputs." if cuda else "= the process's peak RSS so far."),
        f"Command: `python benchmarks/dense_topk.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    for name in args.cases.split(","):
        lines += run_case(name, args)
    text = "\n".join(lines)
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
