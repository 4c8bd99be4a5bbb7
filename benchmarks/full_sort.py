"""Full-sort top-K at Gowalla scale: chunked ``full_sort_topk`` against the naive full matrix.

Setup (fixed seed 0): 29,858 users x 40,981 items (Gowalla as in NGCF/LightGCN), d = 64 random
embeddings, dot-product scores, ~810k random training pairs masked (Gowalla's training density),
K = 20. Variants, each in its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

* ``chunked``: :func:`retrieval.eval.topk.full_sort_topk`, one row per ``--chunk-sizes`` entry;
* ``naive`` (the baseline): materialise the whole users x items float32 score matrix (~4.9 GB at
  full size), set the training pairs to -inf, ``torch.topk``. Skipped when MemAvailable is short.

"extra" memory = peak RSS minus the RSS right before scoring (after torch import, setup and a
warm-up on 64 users). Each variant runs ``--repeats`` times: best wall time, range of extra memory.
A second table times the tie-break strategies on one 1024-user block (see ``topk.py``).

    .venv/bin/python benchmarks/full_sort.py                 # full size, appends to RESULTS.md
    .venv/bin/python benchmarks/full_sort.py --users 3000 --no-append
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench import cpu_model  # noqa: E402

from retrieval.eval.topk import full_sort_topk, topk_with_id_ties
from retrieval.types import ItemSets

GOWALLA_USERS, GOWALLA_ITEMS, GOWALLA_TRAIN = 29_858, 40_981, 810_128
RESULTS = Path(__file__).with_name("RESULTS.md")


def _rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def _setup(users: int, items: int, dim: int, train_pairs: int) -> tuple[torch.Tensor, torch.Tensor, ItemSets]:
    g = torch.Generator().manual_seed(0)
    ue = torch.randn(users, dim, generator=g)  # (U, d)
    ie = torch.randn(items, dim, generator=g)  # (N, d)
    pu = torch.randint(0, users, (train_pairs,), generator=g)
    pi = torch.randint(0, items, (train_pairs,), generator=g)
    return ue, ie, ItemSets.from_pairs(pu, pi, users, items)


def _worker(args: argparse.Namespace) -> None:
    """Run one variant and print one JSON line."""
    ue, ie, train = _setup(args.users, args.items, args.dim, args.train_pairs)
    ue, ie = ue.to(args.device), ie.to(args.device)

    def run(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if args.worker == "naive":
            scores = ue[:n] @ ie.T  # (n, N) the whole matrix
            row, item = train.row_ids(), train.indices
            keep = row < n
            scores[row[keep].to(args.device), item[keep].to(args.device)] = float("-inf")
            vals, items = torch.topk(scores, args.k, dim=1)  # (n, K)
            return vals.cpu(), items.cpu()  # (also waits for the GPU)
        return full_sort_topk(
            lambda u: ue[u] @ ie.T,
            torch.arange(n),
            args.k,
            exclude=train,
            chunk_size=args.chunk,
            device=args.device,
            progress=False,
        )  # (n, K) each

    run(min(64, args.users))  # warm-up: thread pools, CUDA context and kernels
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_now_kb()
    t0 = time.perf_counter()
    vals, items = run(args.users)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save((vals, items), args.save)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
    res = {"wall": wall, "peak_kb": peak, "rss0_kb": rss0, "pairs": int(train.indices.numel())}
    print(json.dumps(res | {"gpu_peak_mb": gpu_peak}))


def _run_variant(args: argparse.Namespace, variant: str, chunk: int, save: str) -> dict:
    opts = {"worker": variant, "chunk": chunk, "save": save, "users": args.users, "items": args.items}
    opts |= {"dim": args.dim, "train-pairs": args.train_pairs, "k": args.k, "device": args.device}
    cmd = [sys.executable, __file__] + [x for name, v in opts.items() for x in (f"--{name}", str(v))]
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    extras = [(r["peak_kb"] - r["rss0_kb"]) / 1024 for r in runs]
    return {
        "wall": min(r["wall"] for r in runs),
        "peak_mb": max(r["peak_kb"] for r in runs) / 1024,
        "extra_min": min(extras),
        "extra_max": max(extras),
        "gpu_peak_mb": max(r["gpu_peak_mb"] for r in runs),
        "pairs": runs[0]["pairs"],
    }


def _agreement(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> str:
    """Compare (scores, items) with the naive run's; torch.topk orders equal scores arbitrarily."""
    n = int((got[1] != ref[1]).any(1).sum())
    if n == 0:
        return "identical"
    if torch.equal(got[0], ref[0]):
        return f"{n} rows differ, only among exactly equal scores"
    return f"{n} rows differ, SCORES DIFFER"


def _time(fn, repeat: int = 3) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _int_key_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact alternative: topk on int64 keys (order-preserving float bits << 32 | reversed id)."""
    bits = s.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # (B, N) monotone in the float value
    comp = (key.to(torch.int64) << 32) | (s.shape[1] - 1 - torch.arange(s.shape[1], device=s.device))
    _, idx = torch.topk(comp, k, dim=1)
    return torch.gather(s, 1, idx), idx


def tie_break_table(items: int, k: int, device: str, block: int = 1024) -> list[str]:
    g = torch.Generator().manual_seed(1)
    blocks = {
        "random float32 (few ties)": torch.randn(block, items, generator=g).to(device),
        "integer scores 0..9 (ties at every cut)": torch.randint(0, 10, (block, items), generator=g)
        .float()
        .to(device),
    }
    strategies = {
        "torch.topk only (ties unspecified)": lambda s: torch.topk(s, k, dim=1),
        "topk(k+1) + boundary fix (used)": lambda s: topk_with_id_ties(s, k),
        "int64 key topk": lambda s: _int_key_topk(s, k),
        "stable full sort": lambda s: torch.sort(s, dim=1, descending=True, stable=True),
    }
    rows = [f"| strategy | {' | '.join(blocks)} |", "|---|" + "---:|" * len(blocks)]
    for name, fn in strategies.items():
        cells = [f"{_time(lambda s=s, fn=fn: fn(s)) * 1e3:,.0f} ms" for s in blocks.values()]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=GOWALLA_USERS)
    p.add_argument("--items", type=int, default=GOWALLA_ITEMS)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--train-pairs", type=int, default=None, help="default: Gowalla's density for --users")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk-sizes", default="128,1024,4096")
    p.add_argument("--no-naive", action="store_true", help="skip the full-matrix baseline")
    p.add_argument("--device", default="cpu", help="where embeddings and scores live (cpu, cuda)")
    p.add_argument("--repeats", type=int, default=2, help="subprocess runs per variant")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--tie-break-only", action="store_true")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_pairs is None:
        args.train_pairs = round(GOWALLA_TRAIN * args.users / GOWALLA_USERS)
    if args.worker:
        _worker(args)
        return

    command = "python benchmarks/full_sort.py " + " ".join(sys.argv[1:])
    lines = [
        f"## full_sort.py, {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- machine: `{platform.uname().machine}`, nproc {os.cpu_count()}, CPU: {cpu_model()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- command: `{command.strip()}`",
        f"- load average at start: {os.getloadavg()[0]:.2f} (the machine may be shared; timings are noisy)",
    ]
    if not args.tie_break_only:
        naive_bytes = args.users * args.items * 4
        lines.append(
            f"- {args.users:,} users x {args.items:,} items, d = {args.dim}, K = {args.k}, "
            f"{args.train_pairs:,} random training pairs drawn (duplicates dropped), seed 0"
        )
        lines.append("")
        with tempfile.TemporaryDirectory() as tmp:
            results = []
            for c in [int(x) for x in args.chunk_sizes.split(",")]:
                results.append(("chunked", c, _run_variant(args, "chunked", c, f"{tmp}/c{c}.pt")))
            naive = None
            if args.no_naive:
                lines.append("- naive baseline: skipped (--no-naive)")
            elif (
                not args.device.startswith("cuda") and _mem_available_kb() * 1024 < 1.5 * naive_bytes + 2**30
            ):
                lines.append(
                    f"- naive baseline: skipped (needs ~{naive_bytes / 2**30:.1f} GiB, too little free)"
                )
            else:
                naive = _run_variant(args, "naive", 0, f"{tmp}/naive.pt")
                results.append(("naive (full matrix + topk)", args.users, naive))
            ref = torch.load(f"{tmp}/naive.pt") if naive else None
            gpu = args.device.startswith("cuda")
            lines.append(
                "| variant | chunk | score block MiB | wall s | users/s | peak RSS MiB | extra MiB "
                "| time / naive | extra mem / naive | top-K vs naive |" + (" peak GPU MiB |" if gpu else "")
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if gpu else ""))
            for name, c, r in results:
                extra = f"{r['extra_min']:,.0f}" + (
                    f"-{r['extra_max']:,.0f}" if round(r["extra_max"]) != round(r["extra_min"]) else ""
                )
                block = min(c, args.users) * args.items * 4 / 2**20
                if naive:
                    t_ratio = f"{r['wall'] / naive['wall']:.2f}x"
                    m_ratio = f"{r['extra_max'] / naive['extra_max']:.3f}x"
                    path = f"{tmp}/naive.pt" if name.startswith("naive") else f"{tmp}/c{c}.pt"
                    same = _agreement(torch.load(path), ref)
                else:
                    t_ratio = m_ratio = same = "n/a"
                lines.append(
                    f"| {name} | {c:,} | {block:,.0f} | {r['wall']:.2f} | {args.users / r['wall']:,.0f} | "
                    f"{r['peak_mb']:,.0f} | {extra} | {t_ratio} | {m_ratio} | {same} |"
                    + (f" {r['gpu_peak_mb']:,.0f} |" if gpu else "")
                )
            lines.append(
                f"\nBest wall time of {args.repeats} runs; peak RSS is the largest, extra the range "
                "(peak RSS minus RSS before scoring): glibc keeps freed blocks in per-thread arenas, so "
                "the chunked runs' peak varies from run to run. Training pairs after dedup: "
                f"{results[0][2]['pairs']:,}."
            )
    lines += ["", f"Tie-break strategies on one 1024 x {args.items:,} block on {args.device}, K = {args.k}"]
    lines += ["(best of 3):", ""]
    lines += tie_break_table(args.items, args.k, args.device)
    lines.append(f"\n- load average at end: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        new = not RESULTS.exists()
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Benchmark results (append-only log)\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
