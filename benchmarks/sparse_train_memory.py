"""SPLADE training memory and speed: plain (B, L, V) logits vs vocabulary-chunked pooling.

    python benchmarks/sparse_train_memory.py --model ../shared/models/splade-tiny            # CPU
    python benchmarks/sparse_train_memory.py --model ../shared/models/splade-tiny --device cuda

One training step = forward of B documents of exactly L word-pieces, FLOPS + a ranking-like
loss, backward, AdamW step. For each pooling (plain = chunk None; chunked = 4096 columns) the
batch doubles until ``--max-batch`` or out of memory (CUDA) / ``--cpu-limit-gib`` of
extrapolated RAM (CPU, where a real out-of-memory would kill the machine: the peak is measured
in a fresh process per batch and the largest batch that fits is extrapolated linearly from the
two largest measured batches). Reports docs/s and peak memory per batch, and the largest batch
that fits. Baseline: the plain pooling, in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import cpu_model, publish  # noqa: E402


def step_stats(model: str, device: str, batch: int, length: int, chunk: int | None, steps: int) -> dict:
    """docs/s and peak memory (GiB) of ``steps`` timed training steps (after one warm-up)."""
    from retrieval.losses import flops
    from retrieval.models import load_sparse_model

    torch.manual_seed(0)
    net = load_sparse_model(model, chunk_size=chunk).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    vocab = net.vocab_size
    ids = torch.randint(1000, vocab, (batch, length), device=device)  # (B, L)
    mask = torch.ones_like(ids)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def one() -> None:
        with autocast:
            w = net(input_ids=ids, attention_mask=mask).float()  # (B, V)
        loss = -w[:, :100].sum(1).mean() + 1e-3 * flops(w)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30  # activations beyond weights + optimizer
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # whole process, GiB
    return {"docs_per_s": batch * steps / seconds, "peak_gib": peak}


def measure_cpu(args, batch: int, chunk: int | None) -> dict:
    """One measurement in a fresh process (its peak RSS is then this configuration's)."""
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--device",
        "cpu",
        "--length",
        str(args.length),
        "--steps",
        str(args.steps),
        "--one",
        json.dumps([batch, chunk]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def sweep(args, chunk: int | None) -> tuple[list[tuple[int, dict]], str]:
    rows, batch, fits = [], args.start_batch, ""
    while batch <= args.max_batch:
        try:
            if args.device == "cuda":
                stats = step_stats(args.model, "cuda", batch, args.length, chunk, args.steps)
                torch.cuda.empty_cache()
            else:
                stats = measure_cpu(args, batch, chunk)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            fits = f"{batch // 2} (batch {batch}: out of memory)"
            break
        rows.append((batch, stats))
        batch *= 2
    if not fits and args.device == "cpu" and len(rows) >= 2:
        (b1, s1), (b2, s2) = rows[-2], rows[-1]
        slope = (s2["peak_gib"] - s1["peak_gib"]) / (b2 - b1)
        limit = int(b2 + (args.cpu_limit_gib - s2["peak_gib"]) / max(slope, 1e-9))
        fits = f"~{limit} (extrapolated to {args.cpu_limit_gib:g} GiB RAM)"
    return rows, fits or f">= {rows[-1][0]} (largest tried)"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--start-batch", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--cpu-limit-gib", type=float, default=24.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        batch, chunk = json.loads(args.one)
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(step_stats(args.model, "cpu", batch, args.length, chunk, args.steps)))
        return
    results = {name: sweep(args, chunk) for name, chunk in (("plain", None), ("chunked 4096", 4096))}
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{cpu_model()}, {torch.get_num_threads()} threads"
    )
    memory = "peak extra GPU memory" if args.device == "cuda" else "peak process RSS"
    lines = [
        f"## SPLADE training step: plain vs chunked pooling ({args.device}) - {dt.date.today()}",
        "",
        f"Machine: {machine}; {platform.python_version()}, torch {torch.__version__}. "
        f"Model {Path(args.model).name}, L = {args.length}, AdamW, {args.steps} timed steps"
        f"{', bf16 autocast' if args.device == 'cuda' else ''}.",
        f"Command: `python benchmarks/sparse_train_memory.py --model {args.model} --device {args.device} "
        f"--max-batch {args.max_batch}`",
        "",
        f"| pooling | batch | docs/s | {memory} (GiB) | docs/s vs plain | memory vs plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    plain = dict(results["plain"][0])
    for name, (rows, _) in results.items():
        for batch, s in rows:
            ref = plain.get(batch)
            lines.append(
                f"| {name} | {batch} | {s['docs_per_s']:.1f} | {s['peak_gib']:.2f} | "
                f"{ratio(s['docs_per_s'], ref['docs_per_s']) if ref else 'n/a (plain OOM)'} | "
                f"{ratio(s['peak_gib'], ref['peak_gib']) if ref else 'n/a'} |"
            )
    lines += ["", *[f"- largest batch that fits, {name}: {fits}" for name, (_, fits) in results.items()]]
    publish("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
