"""SPLADE document encoding speed on the CPU and, when present, a CUDA GPU; checks both give the same vectors.

    python benchmarks/splade_encode_speed.py --model ../shared/models/splade-tiny

Synthetic documents of 10 to 210 words (the length spread of scientific abstracts), batch 64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import publish  # noqa: E402

from retrieval.encoders.splade import SpladeEncoder  # noqa: E402

WORDS = ["protein", "cell", "gene", "tumor", "virus", "binding", "receptor", "expression"]


def documents(n: int) -> list[str]:
    return [f"document {i} " + " ".join(WORDS[j % len(WORDS)] for j in range(i % 200 + 10)) for i in range(n)]


def docs_per_second(model: str, device: str, texts: list[str]) -> tuple[float, torch.Tensor]:
    encoder = SpladeEncoder(model, device=device, batch_size=64)
    encoder.encode(texts[:64], progress=False)  # warm-up
    start = time.perf_counter()
    vectors = encoder.encode(texts, progress=False)
    return len(texts) / (time.perf_counter() - start), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=os.path.join(os.environ.get("SPARROW_MODEL_DIR", "models"), "splade-tiny")
    )
    parser.add_argument("--cpu-docs", type=int, default=300)
    parser.add_argument("--gpu-docs", type=int, default=2000)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    texts = documents(max(args.cpu_docs, args.gpu_docs))
    cpu_rate, cpu_vectors = docs_per_second(args.model, "cpu", texts[: args.cpu_docs])
    rows = [("cpu", f"{cpu_rate:.0f}", "1.0x", "")]
    if torch.cuda.is_available():
        gpu_rate, gpu_vectors = docs_per_second(args.model, "cuda", texts[: args.gpu_docs])
        a, b = cpu_vectors.to_dense(), gpu_vectors.to_dense()[: args.cpu_docs]
        same = f"max |diff| {(a - b).abs().max().item():.1e}, same non-zeros: {torch.equal(a != 0, b != 0)}"
        rows.append((torch.cuda.get_device_name(0), f"{gpu_rate:.0f}", f"{gpu_rate / cpu_rate:.1f}x", same))
    text = "\n".join(
        [
            f"## splade_encode_speed.py, {dt.datetime.now().isoformat(timespec='seconds')}",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            f"- command: `python benchmarks/splade_encode_speed.py --model {args.model}`",
            "",
            "| device | docs/s | vs CPU | CPU vs GPU vectors |",
            "|---|---:|---:|---|",
            *[f"| {d} | {r} | {x} | {s} |" for d, r, x, s in rows],
            "",
        ]
    )
    publish(text, args.results)


if __name__ == "__main__":
    main()
