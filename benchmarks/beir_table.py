"""The retrieval results table: system x BEIR dataset through ``python -m retrieval.evaluate``.

    python benchmarks/beir_table.py                       # scifact and nfcorpus, every system
    python benchmarks/beir_table.py --datasets scifact --systems bm25 impact

Each cell is one run of the user-facing command (index built when missing, under
``--indexes``), so the table shows exactly what ``retrieval.evaluate`` prints. Systems:

* ``bm25``: Lucene BM25 (k1 0.9, b 0.4);
* ``impact`` / ``impact_idf``: splade-tiny documents in a Lucene impact index (x100, rounded),
  queried by splade-tiny (siamese) or by tokenizer + IDF (inference-free);
* ``sparse_torch`` / ``sparse_torch_idf``: the same float vectors scored exactly in torch;
* ``faiss``: all-MiniLM-L6-v2 in a flat inner-product faiss index.

The impact and exact rows of one query side must agree on NDCG@10 within 0.002 (quantization
is the only difference); the script prints that check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import cpu_model, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SYSTEMS = {
    "bm25": ["index=bm25"],
    "impact": ["index=impact", "index.query=splade"],
    "impact_idf": ["index=impact", "index.query=idf"],
    "sparse_torch": ["index=sparse_torch", "index.query=splade"],
    "sparse_torch_idf": ["index=sparse_torch", "index.query=idf"],
    "faiss": ["index=faiss"],
}
COLUMNS = ("ndcg@10", "recall@100", "recall@1000", "mrr@10")


def evaluate(dataset: str, system: str, indexes: Path, threads: int) -> dict:
    """One ``retrieval.evaluate`` run; returns its metrics.json ``test`` entry and timings."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "retrieval.evaluate",
            f"dataset.name={dataset}",
            *SYSTEMS[system],
            f"paths.indexes_dir={indexes}",
            f"threads={threads}",
            f"hydra.run.dir={out}",
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        payload = json.loads((Path(out) / "metrics.json").read_text())
    return {**payload["metrics"]["test"], **{f"{k}_s": v for k, v in payload["timings_s"].items()}}


def table(results: dict[tuple[str, str], dict]) -> list[str]:
    lines = [
        "| system | dataset | NDCG@10 | R@100 | R@1000 | MRR@10 | latency median / p99 (ms) "
        "| index (MB) | avg nnz doc / query | FLOPS | build (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (system, dataset), m in results.items():
        nnz = f"{m['avg_doc_nnz']:.0f} / {m['avg_query_nnz']:.1f}" if "avg_doc_nnz" in m else ""
        flops = f"{m['flops']:.2f}" if "flops" in m else ""
        lines.append(
            f"| {system} | {dataset} | "
            + " | ".join(f"{m[c]:.4f}" for c in COLUMNS)
            + f" | {m['latency_median_ms']:.1f} / {m['latency_p99_ms']:.1f} | {m['index_mb']:.1f} | {nnz} "
            f"| {flops} | {m['build_s']:.0f} |"
        )
    return lines


def agreement(results: dict[tuple[str, str], dict]) -> list[str]:
    """Impact (quantized, Lucene) against exact torch scoring: NDCG@10 differences."""
    lines = []
    for (system, dataset), m in results.items():
        exact = results.get((system.replace("impact", "sparse_torch"), dataset))
        if system.startswith("impact") and exact is not None:
            diff = m["ndcg@10"] - exact["ndcg@10"]
            verdict = "ok" if abs(diff) <= 0.002 else "EXCEEDS 0.002"
            lines.append(f"- {system} vs exact on {dataset}: NDCG@10 difference {diff:+.4f} ({verdict})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--indexes", type=Path, default=REPO / "indexes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    results = {
        (s, d): evaluate(d, s, args.indexes, args.threads) for d in args.datasets for s in args.systems
    }
    text = "\n".join(
        [
            f"## beir_table.py, {dt.datetime.now().isoformat(timespec='seconds')}",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), no GPU used",
            f"- command: `python benchmarks/beir_table.py --datasets {' '.join(args.datasets)} "
            f"--systems {' '.join(args.systems)}`",
            "- each cell: `python -m retrieval.evaluate dataset.name=D index=...`",
            "- metrics: trec_eval -c, BEIR self hits dropped; MRR@10 = recip_rank within the top 10; "
            "latency: one query per call incl. encoding, after 10 warm-ups; build: 0 when the index existed",
            "",
            *table(results),
            "",
            *agreement(results),
            "",
        ]
    )
    publish(text, args.results)


if __name__ == "__main__":
    main()
